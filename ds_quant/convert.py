"""`ds-quant convert MODEL_DIR OUT_DIR --quant-config CFG`: a bf16 HF folder + the merged measurements -> an FP8
folder (checkpoint.py), tensor by tensor.

Each safetensors tensor is read with pread into a buffer of its own (checkpoint.SafetensorsFile; no mmap, whose
touched pages would all count in RSS), a linear's weight is quantized with exactly the scales in-memory QUANTIZE
gives it (model-level, so the TP size plays no role), written straight to its place in the output file (whose
header is planned up front, checkpoint.SafetensorsWriter) and freed before the next tensor. Peak memory: a
few of the largest source tensors; the FP8 model is never all in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import measurements
from .checkpoint import (
    DTYPES,
    CheckpointError,
    FolderWriter,
    Fp8Layer,
    SafetensorsFile,
    SafetensorsFolder,
    Scheme,
    fresh_tensor,
    quantization_config,
    release_freed_memory,
)
from .config import ActScope, ConfigError, Fp8Format, Mode, QuantConfig, resolve_config
from .log import get_logger
from .scales import (
    PROFILES,
    RECIPES,
    Act,
    cast_weight_block,
    fp8_dtype,
    input_to_scale,
    quantize_weight,
    tensor_to_amax,
    weight_scale_blocks,
)

# The DeepSpeed class a measured kind came from, so a config's `types` lists select the same layers here.
_KIND_TYPE = {"column": "LinearLayer", "row": "LinearAllreduce", "lm-head": "LmHeadLinearAllreduce"}


def model_linears(model_dir: str | os.PathLike):
    """({fqn: (out, in)} of every plain linear of the model the folder's config.json describes (built on meta,
    no weights read; MoE routers excluded as prep_model excludes them), rename(file key) -> model key, the model
    on meta)."""
    import transformers
    from accelerate import init_empty_weights
    from torch import nn

    from .load import key_renamer
    from .patch import routers

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


def _selected(cfg: QuantConfig, fqn: str, kind: str | None) -> bool:
    names = {"Linear"} | ({_KIND_TYPE[kind]} if kind in _KIND_TYPE else set())
    if cfg.allowlist.narrows() and not any(cfg.allowlist.matches(t, fqn) for t in names):
        return False
    return not any(cfg.blocklist.matches(t, fqn) for t in names)


def _source_files(model_dir: Path) -> list[str]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (model_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise CheckpointError(f"{model_dir}: no model.safetensors nor model.safetensors.index.json; convert reads "
                          "safetensors (save the model with save_pretrained(..., safe_serialization=True))")


def convert(model_dir: str | os.PathLike, out_dir: str | os.PathLike, config, dtype: torch.dtype = torch.bfloat16,
            progress: bool = True) -> Path:
    """Write the FP8 folder OUT_DIR for MODEL_DIR with the config's scale method and measurements."""
    from tqdm.auto import tqdm

    cfg = resolve_config(config)
    _check_config(cfg)
    src = Path(model_dir)
    files = _source_files(src)
    linears, rename, meta_model = model_linears(src)
    experts = _ExpertsWriter.plan(meta_model, cfg, src, rename, dtype)
    doc, where = _measurements(cfg, linears, experts.records)
    experts.records_doc = doc["layers"] if doc else {}
    records = doc["layers"] if doc else {}
    targets = {n for n, shape in linears.items() if _selected(cfg, n, records.get(n, {}).get("kind"))}
    hess = None
    if cfg.gptq is not None:  # GPTQ rounding of the whole weights: the Hessian file beside the measurements
        from . import hessians

        hess = hessians.read(cfg.dump_stats_path, {n: linears[n][1] for n in targets},
                             doc.get("run") if doc else None)
    fp8 = fp8_dtype(cfg.fp8_config)
    profile = PROFILES[cfg.device_for_scales]
    schemes, seen = {}, set()
    writer = FolderWriter(out_dir)
    try:
        sources = {fname: _open_source(src / fname) for fname in files}
        bar = tqdm(total=sum(len(f.tensors) for f in sources.values()), desc="ds-quant convert", unit="tensor",
                   disable=not progress)
        for fname, f in sources.items():
            plan, jobs = {}, []
            for key in sorted(f.tensors, key=lambda k: f.tensors[k].begin):  # file order: sequential reads
                info = f.tensors[key]
                model_key = rename(key)  # the module name may differ from the file's key (legacy names)
                if experts.owns(model_key):  # one expert's gate, up or down linear: FP8 + scales
                    plan.update(experts.plan_tensor(src / fname, key, model_key, info))
                    jobs.append((key, model_key))
                    continue
                name = model_key[: -len(".weight")] if model_key.endswith(".weight") else None
                if name not in targets:
                    plan[key] = (DTYPES[info.dtype], info.shape)
                    jobs.append((key, None))
                    continue
                if tuple(info.shape) != linears[name]:
                    raise CheckpointError(f"{src / fname}: tensor '{key}' is {list(info.shape)}, the model's "
                                          f"config says {list(linears[name])}")
                recipe = RECIPES[cfg.method_for(name)]
                prefix = key[: -len(".weight")]  # the file's own naming, beside its weight
                plan[key] = (fp8, info.shape)
                plan[f"{prefix}.weight_scale"] = (torch.float32, (info.shape[0], 1) if recipe.weight_per_channel
                                                  else (1,))
                if recipe.act is not Act.DYNAMIC:
                    plan[f"{prefix}.input_scale"] = (torch.float32, (1,))
                jobs.append((key, name))
            out = writer.stream(fname, plan)  # header first; each tensor written as it is made, then freed
            try:
                for key, name in jobs:
                    if experts.owns(name):
                        experts.write(out, key, name)
                        bar.update()
                        continue
                    if name is None:
                        out.write(key, f.read(key))
                        bar.update()
                        continue
                    w_hp = f.read(key).to(dtype)
                    layer, w_fp8 = quantize_linear(name, w_hp, cfg, records.get(name),
                                                   None if hess is None else hess.get(name))
                    del w_hp
                    prefix = key[: -len(".weight")]
                    out.write(key, w_fp8)
                    del w_fp8
                    ws = layer.weight_scale
                    out.write(f"{prefix}.weight_scale", ws.reshape(-1, 1) if ws.dim() else ws.reshape(1))
                    if layer.input_scale is not None:
                        out.write(f"{prefix}.input_scale", layer.input_scale.reshape(1))
                    schemes[name] = Scheme(ws.dim() == 1, layer.input_scale is not None)
                    seen.add(name)
                    bar.update()
                out.close()
            finally:
                out.abort()
            f.close()
        bar.close()
        experts.close()
        missing = sorted(targets - seen)
        if missing:
            raise CheckpointError(f"{src}: no weight tensor for linear(s) {missing[:5]} in the safetensors files "
                                  "(their keys differ from the module names?)")
        writer.copy_files(src)
        model_config = json.loads((src / "config.json").read_text())
        extras = {"scale_method": cfg.scale_method.value, "device_for_scales": cfg.device_for_scales.value,
                  "fp8_config": cfg.fp8_config.value, "act_limit": profile.fp8_max(fp8),
                  "weight_backoff": cfg.weight_backoff, "input_backoff": cfg.input_backoff,
                  "dtype": str(dtype).replace("torch.", ""),
                  "gptq": None if cfg.gptq is None else vars(cfg.gptq),
                  "scale_methods": {n: cfg.method_for(n).value for n in sorted(schemes)
                                    if cfg.method_for(n) != cfg.scale_method},
                  "measurements": None if doc is None else {"file": str(where), "fingerprint": doc["fingerprint"],
                                                           "world_size": doc["world_size"]}}
        model_config["quantization_config"] = quantization_config(
            {**schemes, **experts.schemes}, sorted(set(linears) - set(schemes)) + experts.ignore, extras)
        result = writer.commit(model_config)
    except BaseException:
        writer.abort()
        raise
    get_logger().info(f"wrote {result}: {len(schemes)} FP8 linear(s), {len(linears) - len(schemes)} linear(s) "
                      f"left in {str(dtype).replace('torch.', '')}"
                      + (f", {len(experts.layouts)} fused-experts block(s) as per-expert FP8 linears"
                         if experts.layouts else "") + f" ({cfg.scale_method.value})")
    return result


def quantize_linear(name: str, w_hp: torch.Tensor, cfg: QuantConfig, record: dict | None,
                    hessian: torch.Tensor | None = None):
    """(Fp8Layer with its scales, the FP8 weight) of one whole linear: what in-memory QUANTIZE gives it at any TP
    size (its statistics are reduced over the ranks to the whole tensor's); with `hessian` (config `gptq`) the
    weight is rounded by GPTQ on the same scales."""
    recipe = RECIPES[cfg.method_for(name)]
    fp8, profile = fp8_dtype(cfg.fp8_config), PROFILES[cfg.device_for_scales]
    _check_unchanged(name, w_hp, record)
    w_fp8, w_scale = quantize_weight(w_hp, recipe, fp8, profile, cfg.weight_backoff)
    if hessian is not None:
        from .gptq import gptq_round

        w_fp8 = gptq_round(w_hp, hessian, w_scale, fp8, profile.fp8_max(fp8), cfg.gptq, name=name)[0]
    return Fp8Layer(name, tuple(w_hp.shape), w_scale, _input_scale(recipe, cfg, record)), w_fp8


def _input_scale(recipe, cfg: QuantConfig, record: dict | None) -> torch.Tensor | None:
    if recipe.act is Act.DYNAMIC:
        return None
    amax = torch.tensor(record["input_amax"] if record else 0.0)
    return input_to_scale(amax, recipe, fp8_dtype(cfg.fp8_config), PROFILES[cfg.device_for_scales],
                          cfg.input_backoff).reshape(())


class QuantizingFolder(SafetensorsFolder):
    """A bf16 folder read as if it were an FP8 one (quantize-on-load): `layers[fqn]` gives a linear's scales
    (computed from the whole weight, read in row blocks), `read(fqn.weight, rows, cols)` this rank's FP8 piece,
    cast block by block; only the FP8 shard stays."""

    def __init__(self, folder, rename, cfg: QuantConfig, wanted: dict[str, tuple[int, int]], dtype: torch.dtype,
                 expert_records: dict[str, tuple[int, int]] | None = None):
        """`expert_records`: the measurement records (name -> shape) of the fused experts to quantize too."""
        super().__init__(folder, rename)
        self.cfg, self.dtype = cfg, dtype
        self.act_limit = PROFILES[cfg.device_for_scales].fp8_max(fp8_dtype(cfg.fp8_config))
        doc, _ = _measurements(cfg, wanted, expert_records)
        self.records = doc["layers"] if doc else {}
        self.layers = _Lazy(self, wanted)
        self.fp8, self.profile = fp8_dtype(cfg.fp8_config), PROFILES[cfg.device_for_scales]
        self._last: tuple[str, Fp8Layer, torch.Tensor | None] | None = None

    def quantized(self, fqn: str) -> Fp8Layer:
        """The layer's scales: with a weight search the whole weight is read and quantized (and kept until the
        next layer); otherwise its row blocks are read once for the maxima, and `read` casts only the rows and
        columns asked for (this rank's), block by block: the bf16 weight is never whole in memory."""
        if self._last is None or self._last[0] != fqn:
            self._last = None  # free the previous layer first
            release_freed_memory()
            key, record = f"{fqn}.weight", self.records.get(fqn)
            recipe = RECIPES[self.cfg.method_for(fqn)]
            if recipe.weight_opt:
                w_hp = SafetensorsFolder.read(self, key).to(self.dtype)
                self._last = (fqn, *quantize_linear(fqn, w_hp, self.cfg, record))
            else:
                n, k = self.shape(key)
                step = self._step(k)
                blocks = (SafetensorsFolder.read(self, key, slice(i, min(i + step, n))).to(self.dtype)
                          for i in range(0, max(n, 1), step))
                scale, top = weight_scale_blocks(blocks, n, recipe, self.fp8, self.profile, self.cfg.weight_backoff)
                _check_unchanged(fqn, top, record)
                self._last = (fqn, Fp8Layer(fqn, (n, k), scale, _input_scale(recipe, self.cfg, record)), None)
        return self._last[1]

    @staticmethod
    def _step(k: int, elems: int = 1 << 20) -> int:
        """Rows per block: about `elems` elements (bigger blocks: glibc keeps more of the freed ones)."""
        return max(1, elems // max(1, k))

    def read(self, key, rows=None, cols=None, mapped=False):
        fqn = key[: -len(".weight")] if key.endswith(".weight") else None
        if fqn not in self.layers:
            return super().read(key, rows, cols, mapped)
        layer = self.quantized(fqn)
        w = self._last[2]  # the whole FP8 weight (weight search), or None: cast the rows asked for
        if w is not None and rows is None and cols is None:
            return w
        n, k = layer.shape
        parts = [(r if r is not None else slice(None)).indices(n)[:2] for r in
                 (rows if isinstance(rows, list) else [rows])]
        c0, c1 = (0, k) if cols is None else cols.indices(k)[:2]
        # the local piece in a mapping of its own, off the heap the blocks churn through
        local = fresh_tensor((sum(max(0, b - a) for a, b in parts), max(0, c1 - c0)), self.fp8)
        at, step = 0, self._step(k)
        for a, b in parts:
            for i in range(a, b, step):
                m = min(step, b - i)
                if w is not None:
                    local[at:at + m] = w[i:i + m, c0:c1]
                else:
                    blk = SafetensorsFolder.read(self, key, slice(i, i + m), cols).to(self.dtype)
                    local[at:at + m] = cast_weight_block(blk, layer.weight_scale, i, self.fp8, self.profile)
                at += m
        return local


class _Lazy(dict):
    """fqn -> Fp8Layer, computed on first access (keys known up front)."""

    def __init__(self, folder: QuantizingFolder, wanted):
        super().__init__(dict.fromkeys(wanted))
        self.folder = folder

    def __getitem__(self, fqn):
        if fqn not in self:
            raise KeyError(fqn)
        return self.folder.quantized(fqn)


def _check_config(cfg: QuantConfig) -> None:
    if cfg.mode is not Mode.QUANTIZE:
        raise ConfigError(f"{cfg.source}: convert needs a QUANTIZE config (mode is {cfg.mode.value})")
    if cfg.fp8_config is not Fp8Format.E4M3:
        raise ConfigError(f"{cfg.source}: fp8_config {cfg.fp8_config.value}: compressed-tensors checkpoints hold "
                          "E4M3 (float8_e4m3fn) weights; use E4M3")
    if cfg.act_scope is ActScope.RANK:
        raise ConfigError(f"{cfg.source}: act_scope 'rank' gives each rank its own input scale, a checkpoint holds "
                          "one per layer; use act_scope 'global'")
    if cfg.outlier_channels:
        raise ConfigError(f"{cfg.source}: key 'outlier_channels' ({cfg.outlier_channels}): a compressed-tensors checkpoint "
                          "has no place for the bf16 outlier columns, so its input scales would not be QUANTIZE's; "
                          "set it to 0 for convert (or quantize in memory)")
    if cfg.smooth_alpha is not None:
        raise ConfigError(f"{cfg.source}: key 'smooth_alpha': convert writes the model's own weights, unsmoothed; "
                          "drop the key (smoothing applies to in-memory QUANTIZE of a bf16 model)")


def _measurements(cfg: QuantConfig, linears: dict[str, tuple[int, int]], expert_records: dict | None = None):
    """The merged measurements, checked for the linears whose method needs them and for `expert_records` (the
    per-expert records, name -> shape, of the experts blocks whose method needs them); (None, None) if none do."""
    needs = [n for n in linears if RECIPES[cfg.method_for(n)].needs_measurements]
    if not needs and not expert_records:
        return None, None
    doc, where = measurements.read_local(cfg.dump_stats_path)
    wanted = {n: linears[n] for n in needs if _selected(cfg, n, doc["layers"].get(n, {}).get("kind"))}
    wanted.update(expert_records or {})
    measurements.check_layers(doc, where, wanted)
    return doc, where


def _check_unchanged(name: str, w_hp: torch.Tensor | float, record: dict | None) -> None:
    """`w_hp`: the weight, or its max-abs already computed."""
    measured = None if record is None else record.get("weight_amax")
    if measured is None:
        return
    amax = w_hp if isinstance(w_hp, float) else max((float(tensor_to_amax(c)) for c in w_hp.split(1 << 12)),
                                                      default=0.0)  # row blocks: no copy of the whole weight
    if amax > measured * (1 + 1e-3) + 1e-12:
        raise CheckpointError(f"layer '{name}': weight max-abs {amax:.6g} exceeds the measured {measured:.6g}; the "
                              "weights changed since MEASURE. Measure again.")


def _open_source(path: Path) -> SafetensorsFile:
    try:
        return SafetensorsFile(path)
    except CheckpointError as e:
        raise CheckpointError(str(e).replace("convert again", "save the model again")) from None


class _ExpertsWriter:
    """Fused MoE experts in `convert`. The source holds them as per-expert linears (`load.ExpertLayout`: what
    transformers 5's save_pretrained writes, and the layout llm-compressor, vLLM and HF + compressed-tensors use
    for FP8 experts); each expert's fused slice ([gate; up] rows, or down) is read, quantized with
    `experts.quantize_expert` exactly as in-memory QUANTIZE quantizes it, and written back as per-expert FP8
    linears: `weight`, `weight_scale` (the slice's scale, so gate and up carry the same one, or their rows of the
    per-channel scales), `input_scale` (the expert's). A slice is kept only until all its parts are written."""

    def __init__(self):
        self.layouts, self.specs, self.part_of, self.records = {}, {}, {}, {}
        self.records_doc, self.schemes, self.ignore, self._cache, self._inputs = {}, {}, [], {}, {}
        self.source = None

    @classmethod
    def plan(cls, model, cfg: QuantConfig, src: Path, rename, dtype: torch.dtype) -> _ExpertsWriter:
        from . import layer_spec
        from .experts import record_name
        from .load import check_expert_parts, expert_layouts
        from .patch import make_experts_filter

        self = cls()
        self.dtype = dtype
        layouts = expert_layouts(model)
        if not layouts:
            return self
        try:
            self.source = SafetensorsFolder(src, rename)  # the experts' parts, whichever file holds them
        except CheckpointError as e:
            raise CheckpointError(str(e).replace("convert again", "save the model again")) from None
        file_name = {m: f for m, f in self.source.file_key.items()}
        keep = make_experts_filter(cfg)
        for fqn, layout in layouts.items():
            parent = model.get_submodule(fqn.rpartition(".")[0]) if "." in fqn else model
            for child_name, child in parent.named_children():  # the router: one output per expert, high precision
                w = child._parameters.get("weight") if child is not model.get_submodule(fqn) else None
                if w is not None and w.dim() == 2 and w.shape[0] == layout.num_experts:
                    key = f"{fqn.rpartition('.')[0]}.{child_name}.weight".lstrip(".")
                    self.ignore.append(file_name.get(key, key)[: -len(".weight")])
            if not layout.stored_per_expert(self.source):
                get_logger().warning(f"{src}: '{fqn}' is stored fused (3-D), not as per-expert linears; it is copied "
                                     "as it is (high precision). Save the model with save_pretrained's default "
                                     "layout to convert its experts")
                continue
            if not keep(model.get_submodule(fqn), fqn):  # blocked by the config: high precision, ignored
                self.ignore += [file_name[f"{n}.weight"][: -len(".weight")] for _, _, n, _ in layout.all_parts()]
                continue
            check_expert_parts(self.source, layout, fp8=False, fix="save the model again")
            self.layouts[fqn], self.specs[fqn] = layout, layer_spec.resolve(cfg, fqn, "experts")
            for proj, e, name, rows in layout.all_parts():
                self.part_of[f"{name}.weight"] = (fqn, proj, e, rows)
            if self.specs[fqn].needs_measurements:
                self.records.update({record_name(fqn, p, e): layout.shapes[p] for p in layout.shapes
                                     for e in range(layout.num_experts)})
        return self

    def owns(self, model_key: str | None) -> bool:
        return model_key in self.part_of

    def plan_tensor(self, path: Path, key: str, model_key: str, info) -> dict:
        fqn, proj, e, rows = self.part_of[model_key]
        spec, prefix = self.specs[fqn], key[: -len(".weight")]
        plan = {key: (spec.fp8_dtype, tuple(info.shape)),
                f"{prefix}.weight_scale": (torch.float32, (info.shape[0], 1) if spec.recipe.weight_per_channel
                                           else (1,))}
        if spec.recipe.act is not Act.DYNAMIC:
            plan[f"{prefix}.input_scale"] = (torch.float32, (1,))
        return plan

    def write(self, out, key: str, model_key: str) -> None:
        fqn, proj, e, rows = self.part_of[model_key]
        w_fp8, scale = self._slice(fqn, proj, e)
        prefix = key[: -len(".weight")]
        out.write(key, w_fp8[rows])
        out.write(f"{prefix}.weight_scale", scale[rows].reshape(-1, 1) if scale.dim() else scale.reshape(1))
        inputs = self._input_scales(fqn, proj)
        if inputs is not None:
            out.write(f"{prefix}.input_scale", inputs[e].reshape(1))
        self.schemes[prefix] = Scheme(scale.dim() == 1, inputs is not None)

    def _slice(self, fqn: str, proj: str, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_fp8 (out, in), scale) of expert e's fused slice, quantized on its first part's turn."""
        from .experts import quantize_expert, record_name
        from .load import read_expert_hp

        k = (fqn, proj, e)
        if k not in self._cache:
            layout = self.layouts[fqn]
            w_hp = read_expert_hp(self.source, layout, fqn, proj, e).to(self.dtype)
            _check_unchanged(record_name(fqn, proj, e), w_hp, self.records_doc.get(record_name(fqn, proj, e)))
            self._cache[k] = [*quantize_expert(w_hp, self.specs[fqn]), len(layout.parts(proj, e))]
        entry = self._cache[k]
        entry[2] -= 1
        if entry[2] == 0:
            del self._cache[k]
        return entry[0], entry[1]

    def _input_scales(self, fqn: str, proj: str) -> torch.Tensor | None:
        from .experts import expert_input_scales

        if (fqn, proj) not in self._inputs:
            spec = self.specs[fqn]
            self._inputs[(fqn, proj)] = expert_input_scales(fqn, proj, self.layouts[fqn].num_experts, spec,
                                                            self.records_doc if spec.needs_measurements else None)
        return self._inputs[(fqn, proj)]

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
