"""Load an FP8 folder (checkpoint.py) at any TP size without ever holding the bf16 weights of its FP8 layers.

    from_pretrained(FP8_DIR)   (patched by ds_quant.install)  -> the model built on the meta device, pending
    deepspeed.init_inference   AutoTP makes its TP layers from the meta weights (nothing read, nothing cut)
    prep_model (the hook)      each rank reads only its slices: FP8 weight rows/columns, their scales, biases;
                               the non-linear weights whole; FP8 twins swapped in

The twins get exactly the tensors in-memory QUANTIZE computes at the same TP size (the folder's FP8 weight is
the elementwise cast with the same model-level scale), so the logits are bitwise the same.
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .checkpoint import CheckpointError, Fp8Folder, SafetensorsFolder, is_fp8_folder
from .log import get_logger, rank0_progress
from .tp import PLAIN, Kind, TPLayout, spec_of

_PENDING = "_ds_quant_fp8_pending"
_PATCHED = "__ds_quant_fp8_from_pretrained__"


QUANTIZE_ON_LOAD_ENV = "DS_QUANT_QUANTIZE_ON_LOAD"


@dataclass
class Pending:
    path: str
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # DeepSpeed's to_empty wipes them
    quantize: bool = False  # a bf16 folder, quantized layer by layer as each rank reads its slices


def quantize_on_load() -> bool:
    return os.environ.get(QUANTIZE_ON_LOAD_ENV, "0") not in ("", "0", "false", "False")


def pending(model: nn.Module) -> Pending | None:
    return getattr(model, _PENDING, None)


# -- from_pretrained on meta ---------------------------------------------------------------------------------
def install_from_pretrained(active) -> None:
    """Make `PreTrainedModel.from_pretrained(FP8_DIR)` build on meta (idempotent; does nothing where transformers
    is not installed). `active()` gives the config in force (None, QUANTIZE: load; MEASURE: refused)."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return
    from transformers import PreTrainedModel

    current = PreTrainedModel.__dict__["from_pretrained"]
    if getattr(current.__func__, _PATCHED, False):
        current.__func__.__ds_quant_active__ = active
        return
    original = current.__func__

    @functools.wraps(original)
    def from_pretrained(cls, path, *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and is_fp8_folder(path):
            cfg = from_pretrained.__ds_quant_active__()  # none: the folder's scales are all a load needs
            if cfg is not None and cfg.mode.value != "QUANTIZE":
                raise CheckpointError(f"{path}: an FP8 checkpoint holds no bf16 weights to {cfg.mode.value}; "
                                      "measure the bf16 model")
            return build_on_meta(cls, path, kwargs)
        if quantize_on_load() and isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
            cfg = from_pretrained.__ds_quant_active__()
            if cfg is not None and cfg.mode.value == "QUANTIZE":
                return build_on_meta(cls, path, kwargs, quantize=True)
        return original(cls, path, *args, **kwargs)

    setattr(from_pretrained, _PATCHED, True)
    from_pretrained.__ds_quant_active__ = active
    PreTrainedModel.from_pretrained = classmethod(from_pretrained)


def build_on_meta(cls, path, kwargs: dict, quantize: bool = False) -> nn.Module:
    """The model of FP8_DIR (or, with `quantize`, of a bf16 folder) with every parameter on meta (buffers real),
    marked pending for the hook."""
    import transformers
    from accelerate import init_empty_weights

    folder = SafetensorsFolder(path) if quantize else Fp8Folder(path)  # validates before anything is built
    config = kwargs.get("config")
    config = copy.deepcopy(config) if isinstance(config, transformers.PretrainedConfig) else \
        transformers.AutoConfig.from_pretrained(path)
    config.__dict__.pop("quantization_config", None)
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if dtype in (None, "auto"):
        dtype = getattr(torch, getattr(folder, "extras", {}).get("dtype", "bfloat16"))
    with init_empty_weights():
        try:
            model = cls._from_config(config, dtype=dtype)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = cls._from_config(config, torch_dtype=dtype)
    model.eval()
    try:
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    except OSError:
        pass
    setattr(model, _PENDING, Pending(str(path), {n: b.detach().clone() for n, b in model.named_buffers()},
                                     quantize))
    what = "bf16 checkpoint, quantize-on-load" if quantize else f"FP8 checkpoint ({len(folder.layers)} FP8 linears)"
    get_logger().info(f"{path}: {what}, model built on meta; each rank reads its slices at init_inference")
    return model


# -- after AutoTP: read this rank's slices --------------------------------------------------------------------
def load_pending(model: nn.Module, cfg) -> tuple[nn.Module, list]:
    """Fill a pending model from its folder; returns (model, swap report). Ranks agree on errors."""
    from .patch import swap

    p = pending(model)
    error = None
    try:
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
        for fqn, layout in layouts.items():  # blocks left in high precision, assembled by _fill_rest
            if fqn not in {f for f, _ in experts} and layout.stored_per_expert(folder):
                check_expert_parts(folder, layout, fp8=False)
    except ValueError as e:  # CheckpointError, MeasurementError, ConfigError
        error = e
    _agree(error)
    model, report = swap(model, targets, functools.partial(_fp8_twin, folder),
                         progress=lambda items: rank0_progress(items, "ds_quant load FP8", unit="layer", min_items=8))
    model, experts_report = swap(model, experts, make_experts)
    _fill_rest(model, folder, p, layouts)
    delattr(model, _PENDING)
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
    from . import layer_spec
    from .convert import QuantizingFolder
    from .experts import expert_shapes
    from .patch import find, make_experts_filter, make_filter

    targets = find(model, make_filter(cfg))
    experts = find(model, make_experts_filter(cfg))
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


def _fp8_twin(folder: Fp8Folder, module: nn.Module, fqn: str) -> nn.Module:
    from .modules import Fp8Linear

    info = folder.layers[fqn]
    layout, rows, cols = _local(module, fqn, info.shape, folder.path)
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
    from .experts import _TwinExperts
    from .modules import _TwinLinear

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
                    t = _fused_hp(folder, layouts[fqn], pname, param.dtype).to(_device(param))
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


def key_renamer(model: nn.Module):
    """file key -> the model's key, by the renames transformers applies when it loads this model's checkpoints
    (its WeightRenaming transforms; the fused MoE experts' merges are `ExpertLayout`'s)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        renames = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    except (ImportError, AttributeError, TypeError):
        renames = []

    def rename(key: str) -> str:
        for t in renames:
            key = t.rename_source_key(key)[0]
        return key

    return rename


def _agree(error: Exception | None) -> None:
    """Every rank raises when any rank failed (no rank is left waiting in a collective)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([0 if error is None else dist.get_rank() + 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if error is None and int(flag) > 0:
            raise CheckpointError(f"loading the FP8 checkpoint failed on rank {int(flag) - 1} (see its error)")
    if error is not None:
        raise error


def refuse_compressed(model) -> None:
    """An FP8 folder loaded by compressed-tensors' own loader holds linears with an FP8 weight and a weight_scale;
    AutoTP would cut the weights apart from their scales. Refuse it, saying how to load it instead."""
    if not isinstance(model, nn.Module):
        return
    held = [fqn for fqn, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dtype in (torch.float8_e4m3fn,
                                                                                          torch.float8_e5m2)
            and hasattr(m, "weight_scale") and not hasattr(m, "layout")]
    if held:
        raise CheckpointError(f"layer '{held[0]}' (and {len(held) - 1} more) holds an FP8 weight with a weight_scale: "
                              "an FP8 checkpoint loaded by compressed-tensors, whose scales AutoTP does not cut; call "
                              "from_pretrained after ds_quant.install() (or run through launch/run.py) so ds_quant "
                              "loads it")


# -- fused MoE experts in a folder ------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertLayout:
    """Where a transformers-5 fused-experts block's weights lie in a folder. The ecosystem stores experts as one 2-D
    linear per expert and projection, `{block}.{e}.{leaf}.weight` (+ `weight_scale`, `input_scale` in FP8; leaves
    `w1`/`w3`/`w2` for Mixtral, `gate_proj`/`up_proj`/`down_proj` for Qwen-MoE): what llm-compressor writes, what
    vLLM reads, what transformers 5's `save_pretrained` writes (it reverts its conversion), and transformers merges
    them on load into `gate_up_proj` (E, 2I, H) = [gate; up] per expert and `down_proj` (E, H, I). Names here are
    the model's (after transformers' renames, e.g. Mixtral's `block_sparse_moe.` -> `mlp.`)."""

    name: str  # the block, e.g. model.layers.0.mlp.experts
    num_experts: int
    leaves: dict[str, tuple[str, ...]]  # gate_up_proj -> (gate, up) leaves, down_proj -> (down,)
    shapes: dict[str, tuple[int, int]]  # proj -> one expert's fused (out, in)

    def parts(self, proj: str, expert: int) -> list[tuple[str, slice]]:
        """[(per-expert linear, its rows in the expert's fused (out, in) weight)]: [gate; up] for gate_up_proj."""
        leaves, out = self.leaves[proj], self.shapes[proj][0]
        n = out // len(leaves)
        return [(f"{self.name}.{expert}.{leaf}", slice(i * n, (i + 1) * n)) for i, leaf in enumerate(leaves)]

    def all_parts(self):
        """(proj, expert, per-expert linear, rows) for every part of the block."""
        return [(p, e, name, rows) for p in self.shapes for e in range(self.num_experts)
                for name, rows in self.parts(p, e)]

    def stored_per_expert(self, folder) -> bool:
        return folder.has(f"{self.parts('gate_up_proj', 0)[0][0]}.weight")


def expert_layouts(model: nn.Module) -> dict[str, ExpertLayout]:
    """{block fqn: ExpertLayout} of the model's fused-experts blocks (experts.py handles), by transformers' own
    conversion mapping for this model (its MergeModulelist / Concatenate converters). A block it has no such
    converter for is left out: its folder holds the 3-D parameters as they are."""
    from .experts import is_fused_experts

    converters = _expert_converters(model)
    out = {}
    for fqn, m in model.named_modules():
        if not converters or not is_fused_experts(m):
            continue
        leaves = {proj: lv for suffix, proj, lv in converters if f".{fqn}".endswith(suffix)}
        if set(leaves) == {"gate_up_proj", "down_proj"} and len(leaves["gate_up_proj"]) == 2 and \
                m.gate_up_proj.shape[1] % 2 == 0:
            out[fqn] = ExpertLayout(fqn, int(m.gate_up_proj.shape[0]), leaves,
                                    {p: tuple(getattr(m, p).shape[1:]) for p in ("gate_up_proj", "down_proj")})
    return out


def _expert_converters(model: nn.Module) -> list[tuple[str, str, tuple[str, ...]]]:
    """[(block suffix, proj, leaves)]: transformers' converters that merge per-expert `{block}.*.{leaf}.weight`
    into `{block}.gate_up_proj` (MergeModulelist(0), then Concatenate(1) of gate and up) or `{block}.down_proj`."""
    import re

    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter

        converters = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightConverter)]
    except (ImportError, AttributeError, TypeError):
        return []
    found = []
    for t in converters:
        sources = list(getattr(t, "_original_source_patterns", t.source_patterns))
        targets = list(getattr(t, "_original_target_patterns", t.target_patterns))
        m = re.fullmatch(r"(.*?)\.?(gate_up_proj|down_proj)", targets[0]) if len(targets) == 1 else None
        if m is None:
            continue
        block, proj = m.group(1), m.group(2)
        ops = [(type(o).__name__, getattr(o, "dim", None)) for o in t.operations]
        if ops != [("MergeModulelist", 0)] + ([("Concatenate", 1)] if proj == "gate_up_proj" else []):
            continue
        leaves = [re.fullmatch(re.escape(block) + r"\.\*\.(\w+)\.weight", s) for s in sources]
        if leaves and all(leaves) and len(leaves) == (2 if proj == "gate_up_proj" else 1):
            found.append(("." + block.lstrip("."), proj, tuple(x.group(1) for x in leaves)))
    return found


def check_expert_parts(folder, layout: ExpertLayout, fp8: bool, fix: str = "convert again") -> None:
    """Every per-expert linear of the block is in the folder with its shape and dtype (FP8 with scales, or all in
    high precision): one error naming the file and the tensor."""
    for proj, e, name, rows in layout.all_parts():
        key, shape = f"{name}.weight", (rows.stop - rows.start, layout.shapes[proj][1])
        if not folder.has(key):
            raise CheckpointError(f"{folder.path}: no tensor '{key}' (expert {e} of '{layout.name}.{proj}', as the "
                                  f"model names it); the checkpoint is truncated or for another model: {fix}")
        dtype, got = folder.meta[key]
        kind = "a 2-D F8_E4M3 weight" if fp8 else "a 2-D float weight"
        if tuple(got) != shape or (fp8 and dtype != "F8_E4M3") or (not fp8 and dtype not in ("BF16", "F16", "F32")):
            raise CheckpointError(f"{folder.path / folder.where[key]}: tensor {folder.named(key)} is {dtype} {list(got)}, "
                                  f"expected {kind} {list(shape)} (expert {e} of '{layout.name}.{proj}'); the "
                                  f"checkpoint is corrupt or for another model: {fix}")


def read_expert_hp(folder, layout: ExpertLayout | None, block: str, proj: str, expert: int) -> torch.Tensor:
    """One expert's high-precision (out, in) weight: its per-expert linears' rows concatenated, or its slice of
    the 3-D tensor where the folder holds the block fused."""
    if layout is not None and layout.stored_per_expert(folder):
        parts = [folder.read(f"{name}.weight") for name, _ in layout.parts(proj, expert)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    return folder.read(f"{block}.{proj}", slice(expert, expert + 1))[0]


def _fused_hp(folder, layout: ExpertLayout, proj: str, dtype: torch.dtype) -> torch.Tensor:
    """A high-precision fused parameter (E, out, in) assembled from the per-expert linears of a folder (experts
    the config left in high precision), one expert at a time."""
    from .checkpoint import fresh_tensor

    check_expert_parts(folder, layout, fp8=False)
    out = fresh_tensor((layout.num_experts, *layout.shapes[proj]), dtype)
    for e in range(layout.num_experts):
        out[e] = read_expert_hp(folder, layout, layout.name, proj, e)
    return out


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
    from .checkpoint import fresh_tensor
    from .experts import Fp8Experts

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
    from . import layer_spec
    from .checkpoint import fresh_tensor, release_freed_memory
    from .convert import _check_unchanged as check_unchanged
    from .experts import Fp8Experts, expert_input_scales, quantize_expert, record_name

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
            check_unchanged(record_name(fqn, proj, e), w_hp, (records or {}).get(record_name(fqn, proj, e)))
            w_fp8, scale = quantize_expert(w_hp, spec)
            del w_hp
            w[e] = w_fp8
            s.append(scale)
            del w_fp8
            release_freed_memory()
        weights[proj], scales[proj] = w.to(dev), torch.stack(s).to(dev)
        inputs[proj] = expert_input_scales(fqn, proj, n, spec, records, dev)
    static = all(v is not None for v in inputs.values())
    return Fp8Experts(fqn, module, weights, scales, inputs if static else None, spec.fp8_max)
