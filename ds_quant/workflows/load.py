"""Load an FP8 folder (checkpoint.py) at any TP size without ever holding the bf16 weights of its FP8 layers.

    from_pretrained(FP8_DIR)   (patched by ds_quant.install)  -> the model built on the meta device, pending
    deepspeed.init_inference   AutoTP makes its TP layers from the meta weights (nothing read, nothing cut)
    prep_model (the hook)      each rank reads only its slices: FP8 weight rows/columns, their scales, biases;
                               the non-linear weights whole; FP8 twins swapped in

The twins get exactly the tensors in-memory QUANTIZE computes at the same TP size (the folder's FP8 weight is
the elementwise cast with the same model-level scale), so the logits are bitwise the same.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..errors import CheckpointError
from ..files.checkpoint import Fp8Folder
from ..files.safetensors import fresh_tensor, release_freed_memory
from ..layers.experts import (
    Fp8Experts,
    _TwinExperts,
    expert_input_scales,
    expert_shapes,
    quantize_expert,
    record_name,
)
from ..layers.linear import Fp8Linear, _TwinLinear
from ..layers.patch import find, make_experts_filter, make_filter, swap
from ..layers.state import state_of
from ..log import get_logger, rank0_progress
from ..numerics import layer_spec
from ..parallel import dist
from ..parallel.tp import PLAIN, Kind, TPLayout, spec_of
from .hf_model import (
    ExpertLayout,
    Pending,
    check_expert_parts,
    expert_layouts,
    fused_hp,
    key_renamer,
    read_expert_hp,
)
from .quantize import QuantizingFolder


# -- after AutoTP: read this rank's slices --------------------------------------------------------------------
def load_pending(model: nn.Module, cfg) -> tuple[nn.Module, list]:
    """Fill a pending model from its folder; returns (model, swap report). Ranks agree on errors."""
    state = state_of(model)
    p = state.pending

    def check():
        layouts = expert_layouts(model)
        if p.quantize:
            folder, experts = _quantizing_folder(model, p, cfg, layouts)
            make_experts = functools.partial(_quantized_experts_twin, folder, layouts, cfg)
        else:
            folder = Fp8Folder(p.path, key_renamer(model))
            experts, scales = _fp8_experts(model, folder, layouts)
            make_experts = functools.partial(_fp8_experts_twin, folder, layouts, scales)
        targets = [(fqn, m) for fqn, m in model.named_modules() if spec_of(m) is not None and fqn in folder.layers]
        parts = {name for fqn, _ in experts if fqn in layouts and not p.quantize
                 for _, _, name, _ in layouts[fqn].all_parts()}
        _check_covered(model, folder, {fqn for fqn, _ in targets} | parts)
        # each linear's piece of the folder's weight, checked against the model's shape before any rank swaps
        local = {fqn: _local(m, fqn, folder.layers[fqn].shape, folder.path) for fqn, m in targets}
        for fqn, layout in layouts.items():  # blocks left in high precision, assembled by _fill_rest
            if fqn not in {f for f, _ in experts} and layout.stored_per_expert(folder):
                check_expert_parts(folder, layout, fp8=False)
        return layouts, folder, experts, make_experts, targets, local

    # Every rank checks its part of the folder before any swaps: one rank's failure is every rank's one line.
    layouts, folder, experts, make_experts, targets, local = dist.agree(check, what="loading the FP8 checkpoint")
    model, report = swap(model, targets, functools.partial(_fp8_twin, folder, local),
                         progress=lambda items: rank0_progress(items, "ds_quant load FP8", unit="layer", min_items=8))
    model, experts_report = swap(model, experts, make_experts)
    _fill_rest(model, folder, p, layouts)
    state.pending = None
    return model, report + experts_report


def _fp8_experts(model: nn.Module, folder: Fp8Folder, layouts: dict) -> tuple[list, dict]:
    """The fused-experts blocks the folder holds in FP8 (as per-expert FP8 linears), each checked whole, and their
    scales (`_expert_scales`)."""
    experts, scales = [], {}
    for fqn, layout in layouts.items():
        names = [name for _, _, name, _ in layout.all_parts()]
        if not any(name in folder.layers for name in names):
            continue  # left in high precision (or fused): _fill_rest reads it
        check_expert_parts(folder, layout, fp8=True)
        experts.append((fqn, model.get_submodule(fqn)))
        scales[fqn] = _expert_scales(folder, layout)
    return experts, scales


def _quantizing_folder(model: nn.Module, p: Pending, cfg, layouts: dict):
    """Quantize-on-load: the linears and fused-experts blocks in-memory QUANTIZE would swap (the same filters, on
    the TP layers; experts are whole on every rank)."""
    targets = find(model, make_filter(functools.partial(cfg.selects, "linear")))
    experts = find(model, make_experts_filter(functools.partial(cfg.selects, "experts")))
    wanted = {fqn: TPLayout.of(m).full_shape(*m.weight.shape) if spec_of(m) is not PLAIN else tuple(m.weight.shape)
              for fqn, m in targets}
    records = {}
    for fqn, m in experts:
        if layer_spec.resolve(cfg, fqn, "experts").needs_measurements:
            records.update(expert_shapes(m, fqn))
    dtype = targets[0][1].weight.dtype if targets else torch.bfloat16
    folder = QuantizingFolder(p.path, key_renamer(model), cfg, wanted, dtype, records)
    for fqn, m in experts:
        layout = layouts.get(fqn)
        if layout is not None and layout.stored_per_expert(folder):
            check_expert_parts(folder, layout, fp8=False)
        else:
            for proj in ("gate_up_proj", "down_proj"):
                key, want = f"{fqn}.{proj}", tuple(getattr(m, proj).shape)
                if not folder.has(key):
                    raise CheckpointError(f"{folder.path}: no tensor '{key}' nor per-expert weights of '{fqn}'; the "
                                          "checkpoint is for another model")
                if tuple(folder.shape(key)) != want:
                    raise CheckpointError(f"{folder.path / folder.where[key]}: tensor '{key}' is "
                                          f"{list(folder.shape(key))}, the model's is {list(want)}; the checkpoint "
                                          "is for another model")
    return folder, experts


def _check_covered(model: nn.Module, folder: Fp8Folder, fp8: set[str]) -> None:
    missing = sorted(set(folder.layers) - fp8)
    if missing:
        raise CheckpointError(f"{folder.path}: FP8 layers {missing[:5]} are not linears of this model (or of a "
                              "TP class ds_quant handles); the checkpoint is for another model")


def _local(module: nn.Module, fqn: str, full: tuple[int, ...], where):
    """(layout, rows, cols) of this rank's piece of a linear's full (out, in) weight: rows a slice or a list of
    slices (a fused layer's sub-parameters), cols a slice or None."""
    layout = TPLayout.of(module)
    spec = layout.spec
    if spec is not PLAIN and spec.weight_transposed:
        raise CheckpointError(f"layer '{fqn}': DeepSpeed {type(module).__name__} holds a transposed Conv1D weight; "
                              "loading its slices from a checkpoint is not implemented")
    want = layout.full_shape(*module.weight.shape) if spec is not PLAIN else tuple(module.weight.shape)
    if tuple(full) != tuple(want):
        raise CheckpointError(f"{where}: layer '{fqn}' is {list(full)} in the checkpoint, {list(want)} in the "
                              "model; the checkpoint is for another model")
    if spec is PLAIN or layout.tp_size == 1:
        return layout, None, None
    if spec.sub_params:
        return layout, _sub_param_rows(module, *full), None
    part = slice(layout.shard_offset, layout.shard_offset + layout.partition_sizes[layout.tp_rank])
    return (layout, part, None) if spec.partitioned_dim == 0 else (layout, None, part)


def _sub_param_rows(module: nn.Module, out_full: int, in_full: int) -> list[slice]:
    """The rows of the full weight a fused / packed layer keeps on this rank, found by letting DeepSpeed cut a
    tensor of row numbers exactly as it cuts the weight (its layouts depend on the model: qkv orders, heads,
    uneven widths). The (out, in) index is a stride-0 view: only this rank's rows are ever materialised
    (float32: exact up to 2^24 rows)."""
    index = torch.arange(out_full, dtype=torch.float32)[:, None].expand(out_full, in_full)
    probe = nn.Parameter(index, requires_grad=False)
    module._tp_partition([probe, None])
    rows = probe.data[:, 0].to("cpu", torch.int64).tolist()
    if len(rows) != module.weight.shape[0]:
        raise CheckpointError(f"layer '{getattr(module, 'name', '?')}': DeepSpeed's cut gives {len(rows)} rows, its "
                              f"weight has {module.weight.shape[0]}")
    runs, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1:
            runs.append(slice(rows[start], rows[i - 1] + 1))
            start = i
    return runs


def _take(t: torch.Tensor, rows) -> torch.Tensor:
    """Rows of an in-memory tensor (a per-channel scale) by the same selection as `Fp8Folder.read`."""
    if rows is None or t.dim() == 0:
        return t
    return torch.cat([t[r] for r in rows]) if isinstance(rows, list) else t[rows]


def _device(t: torch.Tensor) -> torch.device:
    return torch.device("cpu") if t.device.type == "meta" else t.device


def _fp8_twin(folder: Fp8Folder, local: dict, module: nn.Module, fqn: str) -> nn.Module:
    """`local`: {fqn: `_local(...)`}, found (and checked) by every rank before any swap."""
    info = folder.layers[fqn]
    layout, rows, cols = local[fqn]
    dev, dtype = _device(module.weight), module.weight.dtype
    # a whole weight (TP=1, or a layer AutoTP left whole) is file-backed, as HF maps bf16 weights: no copy at load,
    # pages resident as they are used, shared with other processes through the page cache; slices are read (pread)
    w_fp8 = folder.read(f"{fqn}.weight", rows, cols, mapped=rows is None and cols is None).to(dev)
    w_scale = _take(info.weight_scale, rows)
    bias = None
    if getattr(module, "bias", None) is not None:
        bias = folder.read(f"{fqn}.bias", rows if layout.kind is Kind.COLUMN else None).to(dev, dtype)
    scale_in = None if info.input_scale is None else info.input_scale.to(dev)
    return Fp8Linear(fqn, layout, w_fp8, w_scale.to(dev), scale_in, bias, dtype, folder.act_limit)


def _fill_rest(model: nn.Module, folder: Fp8Folder, p: Pending, layouts: dict) -> None:
    """Every parameter not in an FP8 twin: TP layers left in high precision get their slices, the rest whole;
    fused experts left in high precision are assembled from their per-expert linears. A parameter shared by
    several modules (tied embeddings) is read once and shared again."""
    done: dict[int, nn.Parameter] = {}
    for fqn, mod in model.named_modules():
        if isinstance(mod, (_TwinLinear, _TwinExperts)):
            continue
        spec = spec_of(mod) if "weight" in mod._parameters else None
        for pname, param in list(mod._parameters.items()):
            if param is None:
                continue
            if id(param) not in done:
                key = f"{fqn}.{pname}" if fqn else pname
                if fqn in layouts and not folder.has(key) and layouts[fqn].stored_per_expert(folder):
                    t = fused_hp(folder, layouts[fqn], pname, param.dtype).to(_device(param))
                    mod._parameters[pname] = done[id(param)] = nn.Parameter(t, requires_grad=False)
                    continue
                if not folder.has(key):
                    raise CheckpointError(f"{folder.path}: no tensor '{key}'; the checkpoint is for another model")
                if folder.meta[key][0].startswith("F8"):  # an FP8 tensor read without its scale would be wrong
                    raise CheckpointError(f"{folder.path / folder.where[key]}: tensor {folder.named(key)} is "
                                          f"{folder.meta[key][0]} without the scales ds_quant reads (a weight_scale "
                                          "beside a 2-D weight, or per-expert linears); ds_quant cannot load it")
                rows = cols = None
                if spec is not None and spec is not PLAIN:
                    layout, rows, cols = _local(mod, fqn, folder.shape(f"{fqn}.weight"), folder.path)
                    if pname == "bias":
                        rows, cols = (rows if layout.kind is Kind.COLUMN else None), None
                # whole tensors used as they are (embeddings, norms): file-backed, only touched pages resident
                t = folder.read(key, rows, cols, mapped=rows is None and cols is None).to(_device(param), param.dtype)
                done[id(param)] = nn.Parameter(t, requires_grad=False)
            mod._parameters[pname] = done[id(param)]
    buffers = dict(model.named_buffers())
    for name, saved in p.buffers.items():
        if name in buffers:
            owner, _, bname = name.rpartition(".")
            m = model.get_submodule(owner)
            m._buffers[bname] = (folder.read(name) if folder.has(name) else saved).to(_device(buffers[name]),
                                                                                        buffers[name].dtype)


def _expert_scales(folder: Fp8Folder, layout: ExpertLayout) -> dict:
    """The block's scales from its per-expert linears' (read and checked at open): {proj: (weight scales (E,) or
    (E, out), input scales (E,) or None)}. A ds_quant folder holds one weight scale per expert for gate and up
    (the fused slice's); a folder whose gate and up scales differ gets per-row scales (exact: each row keeps its
    own), and differing gate / up input scales take the larger (the two share their input), logged."""
    out = {}
    for proj in layout.shapes:
        ws, ins = [], []
        for e in range(layout.num_experts):
            parts = [(folder.layers[name], rows) for name, rows in layout.parts(proj, e)]
            w = [info.weight_scale for info, _ in parts]
            if all(s.dim() == 0 for s in w) and all(torch.equal(s, w[0]) for s in w):
                ws.append(w[0])
            else:
                ws.append(torch.cat([s.expand(r.stop - r.start) if s.dim() == 0 else s
                                     for s, (_, r) in zip(w, parts, strict=True)]))
            i = [info.input_scale for info, _ in parts]
            if any(x is None for x in i) != all(x is None for x in i):
                name = next(info.name for info, _ in parts if info.input_scale is None)
                raise CheckpointError(f"{folder.path / folder.where[name + '.weight']}: no input_scale beside tensor "
                                      f"{folder.named(name + '.weight')}, which the other experts of '{layout.name}' "
                                      "have; the checkpoint is corrupt: convert again")
            if i[0] is not None and not all(torch.equal(x, i[0]) for x in i):
                get_logger().info(f"{layout.name}.{proj}: expert {e}'s gate and up input scales differ; the larger is "
                                  "used (they share one input)")
            ins.append(None if i[0] is None else torch.stack(i).max())
        if any(x is None for x in ins) != all(x is None for x in ins):
            raise CheckpointError(f"{folder.path}: the experts of '{layout.name}.{proj}' mix static and dynamic "
                                  "activations; the checkpoint is corrupt: convert again")
        if any(s.dim() for s in ws):
            ws = [s.expand(layout.shapes[proj][0]) if s.dim() == 0 else s for s in ws]
        out[proj] = (torch.stack(ws), None if ins[0] is None else torch.stack(ins))
    return out


def _fp8_experts_twin(folder: Fp8Folder, layouts: dict, scales: dict, module: nn.Module, fqn: str) -> nn.Module:
    """Fp8Experts filled from the folder's per-expert FP8 linears, each read straight into its rows of the 3-D
    FP8 weight: no bf16 expert weight is ever made."""
    layout, dev = layouts[fqn], _device(module.gate_up_proj)
    weights, ws, ins = {}, {}, {}
    for proj, (w_scale, in_scale) in scales[fqn].items():
        w = fresh_tensor((layout.num_experts, *layout.shapes[proj]), torch.float8_e4m3fn)
        for e in range(layout.num_experts):
            for name, rows in layout.parts(proj, e):
                w[e, rows] = folder.read(f"{name}.weight")
        weights[proj], ws[proj], ins[proj] = w.to(dev), w_scale.to(dev), None if in_scale is None else in_scale.to(dev)
    static = all(v is not None for v in ins.values())
    return Fp8Experts(fqn, module, weights, ws, ins if static else None, folder.act_limit)


def _quantized_experts_twin(folder, layouts: dict, cfg, module: nn.Module, fqn: str) -> nn.Module:
    """Quantize-on-load of a fused-experts block: one expert's bf16 weight read at a time, quantized as in-memory
    QUANTIZE quantizes it (experts.quantize_expert), freed."""
    spec, layout = layer_spec.resolve(cfg, fqn, "experts"), layouts.get(fqn)
    dev, dtype = _device(module.gate_up_proj), module.gate_up_proj.dtype
    records = folder.records if spec.needs_measurements else None
    weights, scales, inputs = {}, {}, {}
    for proj in ("gate_up_proj", "down_proj"):
        n = int(getattr(module, proj).shape[0])
        w = fresh_tensor(tuple(getattr(module, proj).shape), spec.fp8_dtype)
        s = []
        for e in range(n):
            w_hp = read_expert_hp(folder, layout, fqn, proj, e).to(dtype)
            w_fp8, scale = quantize_expert(w_hp, spec, (records or {}).get(record_name(fqn, proj, e)),
                                           record_name(fqn, proj, e))
            del w_hp
            w[e] = w_fp8
            s.append(scale)
            del w_fp8
            release_freed_memory()
        weights[proj], scales[proj] = w.to(dev), torch.stack(s).to(dev)
        inputs[proj] = expert_input_scales(fqn, proj, n, spec, records, dev)
    static = all(v is not None for v in inputs.values())
    return Fp8Experts(fqn, module, weights, scales, inputs if static else None, spec.fp8_max)
