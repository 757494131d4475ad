"""The HF-model adapter: models built on meta from a folder, transformers' key renames, fused-experts
layouts in a folder, and checkpoints loaded by another tool."""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import CheckpointError
from ..files.checkpoint import Fp8Folder, is_fp8_folder
from ..files.safetensors import SafetensorsFolder, fresh_tensor
from ..layers.experts import is_fused_experts
from ..layers.patch import routers
from ..layers.state import state_of
from ..log import get_logger

_PATCHED = "__ds_quant_fp8_from_pretrained__"


QUANTIZE_ON_LOAD_ENV = "DS_QUANT_QUANTIZE_ON_LOAD"
"""`1` / `0`: overrides the config key `quantize_on_load` (from_pretrained of a bf16 folder quantizes as it reads)."""


@dataclass
class Pending:
    path: str
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # DeepSpeed's to_empty wipes them
    quantize: bool = False  # a bf16 folder, quantized layer by layer as each rank reads its slices


def quantize_on_load(cfg) -> bool:
    """The config key `quantize_on_load` of `cfg` (a QUANTIZE config in force), unless DS_QUANT_QUANTIZE_ON_LOAD
    overrides it; False without a QUANTIZE config (there is nothing to quantize with)."""
    if cfg is None or cfg.mode.value != "QUANTIZE":
        return False
    env = os.environ.get(QUANTIZE_ON_LOAD_ENV, "")
    return env not in ("0", "false", "False") if env else cfg.quantize_on_load


def pending(model: nn.Module) -> Pending | None:
    state = state_of(model)
    return None if state is None else state.pending


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
        if isinstance(path, (str, os.PathLike)) and os.path.isdir(path) and \
                quantize_on_load(from_pretrained.__ds_quant_active__()):
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
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    state_of(model, create=True).pending = Pending(str(path), buffers, quantize)
    what = "bf16 checkpoint, quantize-on-load" if quantize else f"FP8 checkpoint ({len(folder.layers)} FP8 linears)"
    get_logger().info(f"{path}: {what}, model built on meta; each rank reads its slices at init_inference")
    return model


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


def fused_hp(folder, layout: ExpertLayout, proj: str, dtype: torch.dtype) -> torch.Tensor:
    """A high-precision fused parameter (E, out, in) assembled from the per-expert linears of a folder (experts
    the config left in high precision), one expert at a time."""
    check_expert_parts(folder, layout, fp8=False)
    out = fresh_tensor((layout.num_experts, *layout.shapes[proj]), dtype)
    for e in range(layout.num_experts):
        out[e] = read_expert_hp(folder, layout, layout.name, proj, e)
    return out


def model_linears(model_dir: str | os.PathLike):
    """({fqn: (out, in)} of every plain linear of the model the folder's config.json describes (built on meta,
    no weights read; MoE routers excluded as prep_model excludes them), rename(file key) -> model key, the model
    on meta)."""
    import transformers
    from accelerate import init_empty_weights
    from torch import nn


    config = transformers.AutoConfig.from_pretrained(model_dir)
    config.__dict__.pop("quantization_config", None)
    with init_empty_weights():
        try:
            model = transformers.AutoModelForCausalLM.from_config(config)
        except ValueError:
            model = transformers.AutoModel.from_config(config)
    keep_hp = routers(model)
    # a linear whose weight is tied to another module (lm_head = embed_tokens) stays as the file holds it
    holders = {}
    for fqn, m in model.named_modules():
        for p in m.parameters(recurse=False):
            holders.setdefault(id(p), []).append(fqn)
    keep_hp |= {f for names in holders.values() if len(names) > 1 for f in names}
    return {fqn: (m.out_features, m.in_features) for fqn, m in model.named_modules()
            if isinstance(m, nn.Linear) and fqn not in keep_hp
            and (type(m).forward is nn.Linear.forward or type(m).__name__ == "FalconLinear")}, key_renamer(model), model
