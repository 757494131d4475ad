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
        folder = _quantizing_folder(model, p, cfg) if p.quantize else Fp8Folder(p.path, key_renamer(model))
        targets = [(fqn, m) for fqn, m in model.named_modules() if spec_of(m) is not None and fqn in folder.layers]
        _check_covered(model, folder, {fqn for fqn, _ in targets})
    except ValueError as e:  # CheckpointError, MeasurementError, ConfigError
        error = e
    _agree(error)
    model, report = swap(model, targets, functools.partial(_fp8_twin, folder),
                         progress=lambda items: rank0_progress(items, "ds_quant load FP8", unit="layer", min_items=8))
    _fill_rest(model, folder, p)
    delattr(model, _PENDING)
    return model, report


def _quantizing_folder(model: nn.Module, p: Pending, cfg):
    """Quantize-on-load: the linears in-memory QUANTIZE would swap (the same filter, on the TP layers)."""
    from .convert import QuantizingFolder
    from .patch import find, make_experts_filter, make_filter

    if find(model, make_experts_filter(cfg)):
        raise CheckpointError(f"{p.path}: quantize-on-load does not handle fused MoE experts yet; unset "
                              f"{QUANTIZE_ON_LOAD_ENV} to quantize in memory")
    targets = find(model, make_filter(cfg))
    wanted = {fqn: TPLayout.of(m).full_shape(*m.weight.shape) if spec_of(m) is not PLAIN else tuple(m.weight.shape)
              for fqn, m in targets}
    dtype = targets[0][1].weight.dtype if targets else torch.bfloat16
    return QuantizingFolder(p.path, key_renamer(model), cfg, wanted, dtype)


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


def _fill_rest(model: nn.Module, folder: Fp8Folder, p: Pending) -> None:
    """Every parameter not in an FP8 twin: TP layers left in high precision get their slices, the rest whole.
    A parameter shared by several modules (tied embeddings) is read once and shared again."""
    from .modules import _TwinLinear

    done: dict[int, nn.Parameter] = {}
    for fqn, mod in model.named_modules():
        if isinstance(mod, _TwinLinear):
            continue
        spec = spec_of(mod) if "weight" in mod._parameters else None
        for pname, param in list(mod._parameters.items()):
            if param is None:
                continue
            if id(param) not in done:
                key = f"{fqn}.{pname}" if fqn else pname
                if not folder.has(key):
                    raise CheckpointError(f"{folder.path}: no tensor '{key}'; the checkpoint is for another model")
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
    (its WeightRenaming transforms; other conversions, such as fused MoE experts, are not applied)."""
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
