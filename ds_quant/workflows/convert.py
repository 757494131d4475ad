"""`ds-quant convert MODEL_DIR OUT_DIR --quant-config CFG`: a bf16 HF folder + the merged measurements -> an FP8
folder (checkpoint.py), tensor by tensor.

Each safetensors tensor is read with pread into a buffer of its own (checkpoint.SafetensorsFile; no mmap, whose
touched pages would all count in RSS), a linear's weight is quantized with exactly the scales in-memory QUANTIZE
gives it (model-level, so the TP size plays no role), written straight to its place in the output file (whose
header is planned up front, checkpoint.SafetensorsWriter) and freed before the next tensor. Peak memory: a
few of the largest source tensors; the FP8 model is never all in memory.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from ..config import ActScope, Fp8Format, Mode, QuantConfig, resolve_config
from ..errors import CheckpointError, ConfigError
from ..files import hessians
from ..files.checkpoint import FolderWriter, Scheme, quantization_config
from ..files.safetensors import DTYPES, SafetensorsFile, SafetensorsFolder
from ..layers.experts import expert_input_scales, quantize_expert, record_name
from ..layers.patch import make_experts_filter
from ..log import get_logger
from ..numerics import layer_spec
from ..numerics.scales import Act
from .hf_model import check_expert_parts, expert_layouts, model_linears, read_expert_hp
from .quantize import checked_measurements, quantize_linear, selected_by_lists


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
    doc, where = checked_measurements(cfg, linears, experts.records)
    experts.records_doc = doc["layers"] if doc else {}
    records = doc["layers"] if doc else {}
    targets = {n for n, shape in linears.items() if selected_by_lists(cfg, n, records.get(n, {}).get("kind"))}
    hess = None
    if cfg.gptq is not None:  # GPTQ rounding of the whole weights: the Hessian file beside the measurements

        hess = hessians.read(cfg.dump_stats_path, {n: linears[n][1] for n in targets},
                             doc.get("run") if doc else None)
    specs = {n: layer_spec.resolve(cfg, n) for n in targets}  # each linear's numbers, as in-memory QUANTIZE's
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
                recipe = specs[name].recipe
                prefix = key[: -len(".weight")]  # the file's own naming, beside its weight
                plan[key] = (specs[name].fp8_dtype, info.shape)
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
                    layer, w_fp8 = quantize_linear(name, w_hp, specs[name], records.get(name),
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
                  "fp8_config": cfg.fp8_config.value, "act_limit": layer_spec.resolve(cfg, "").fp8_max,
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
        keep = make_experts_filter(functools.partial(cfg.selects, "experts"))
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
        k = (fqn, proj, e)
        if k not in self._cache:
            layout = self.layouts[fqn]
            w_hp = read_expert_hp(self.source, layout, fqn, proj, e).to(self.dtype)
            name = record_name(fqn, proj, e)
            self._cache[k] = [*quantize_expert(w_hp, self.specs[fqn], self.records_doc.get(name), name),
                              len(layout.parts(proj, e))]
        entry = self._cache[k]
        entry[2] -= 1
        if entry[2] == 0:
            del self._cache[k]
        return entry[0], entry[1]

    def _input_scales(self, fqn: str, proj: str) -> torch.Tensor | None:
        if (fqn, proj) not in self._inputs:
            spec = self.specs[fqn]
            self._inputs[(fqn, proj)] = expert_input_scales(fqn, proj, self.layouts[fqn].num_experts, spec,
                                                            self.records_doc if spec.needs_measurements else None)
        return self._inputs[(fqn, proj)]

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
