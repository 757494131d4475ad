"""Public entry points: `prep_model` (MEASURE or QUANTIZE a model) and `finish_measurements`."""

from __future__ import annotations

import atexit
import os
import weakref

import torch
from torch import nn

from . import load as fp8_load
from . import measurements
from .config import ConfigError, Mode, QuantConfig, resolve_config
from .experts import Fp8Experts, MeasuredExperts, _TwinExperts, expert_shapes
from .log import current_rank, get_logger, rank0_progress, verbose
from .modules import Fp8Linear, MeasuredLinear, _TwinLinear
from .patch import (
    find,
    format_report,
    format_skipped,
    make_experts_filter,
    make_filter,
    skipped_tp_layers,
    swap,
)
from .scales import RECIPES
from .tp import TPLayout

_CONFIG_ATTR = "_ds_quant_config"


def prep_model(model: nn.Module, config: QuantConfig | dict | str | os.PathLike | None = None) -> nn.Module:
    """Swap the model's linears for measured (MEASURE) or FP8 (QUANTIZE) twins, per the config.

    `config`: a QuantConfig, a dict, or a JSON path; else `--quant-config FILE`, else `QUANT_CONFIG`.
    Works on `engine.module` after `deepspeed.init_inference`, and on a plain single-process model.
    """
    cfg = resolve_config(config)
    if cfg is None:
        raise ConfigError("no quantization config: pass config=, --quant-config FILE, or set QUANT_CONFIG")
    if cfg.auto_blocklist_sqnr_db is not None:
        get_logger().warning("auto_blocklist_sqnr_db needs calibration data, which prep_model does not have: it is "
                             "ignored here; use ds_quant.report.quantize_with_report(model, config, batches) or "
                             "`ds-quant report`")
    if fp8_load.pending(model) is not None:  # from_pretrained of an FP8 folder built it on meta (load.py)
        if cfg.mode is not Mode.QUANTIZE:
            raise ConfigError(f"{cfg.source}: an FP8 checkpoint holds no bf16 weights to {cfg.mode.value}")
        model, report = fp8_load.load_pending(model, cfg)
        _log_outcome(model, cfg, report)
        setattr(model, _CONFIG_ATTR, cfg)
        return model
    fp8_load.refuse_compressed(model)
    if any(isinstance(m, (_TwinLinear, _TwinExperts)) for m in model.modules()):
        raise RuntimeError("this model was already prepared by ds_quant; prepare the original model once")
    targets = find(model, make_filter(cfg))
    experts = find(model, make_experts_filter(cfg))
    if cfg.mode is Mode.MEASURE:
        make, make_experts = _measured_maker(cfg), _measured_experts_maker(cfg)
    else:
        make, make_experts = _fp8_makers(cfg, targets, experts)
    def progress(items):
        return rank0_progress(items, f"ds_quant {cfg.mode.value}", unit="layer", min_items=8)

    model, report = swap(model, targets, make, progress=progress)
    model, experts_report = swap(model, experts, make_experts)
    report += experts_report
    _log_outcome(model, cfg, report)
    setattr(model, _CONFIG_ATTR, cfg)
    if cfg.mode is Mode.MEASURE:
        _save_at_exit(model)
    return model


def finish_measurements(model: nn.Module) -> str | None:
    """Write this rank's shard and, on TP rank 0, the merged model-level file. Collective over the TP
    group: every rank must call it. Returns the merged file's path on rank 0."""
    cfg: QuantConfig | None = getattr(model, _CONFIG_ATTR, None)
    measured = {n: m for n, m in model.named_modules() if isinstance(m, MeasuredLinear)}
    measured_experts = [m for m in model.modules() if isinstance(m, MeasuredExperts)]
    if cfg is None or not (measured or measured_experts):
        raise RuntimeError("finish_measurements: this model was not prepared in MEASURE mode by ds_quant.prep_model")
    rank, world, group = tp_position(measured.values())
    if world == 1 and current_rank() != 0:
        return None  # a replicated single-rank model: one writer is enough
    layers = {n: m.stats() for n, m in measured.items()}
    for m in measured_experts:  # one plain record per expert projection (experts are whole on every rank)
        layers.update(m.stats())
    dtype = str(next(iter(measured.values())).weight.dtype if measured else measured_experts[0].gate_up_proj.dtype
                ).replace("torch.", "")
    out = measurements.save(layers, cfg.dump_stats_path, rank, world, group, cfg.observer.value, dtype)
    log = get_logger()
    log.info(f"wrote {measurements.shard_path(cfg.dump_stats_path, rank, world)}"
             + (f" and merged {out} ({len(layers)} layers)" if out else ""))
    if cfg.dump_stats_xlsx_path and out:
        from .workbook import write_from_files

        log.info(f"wrote statistics workbook {write_from_files(cfg.dump_stats_xlsx_path, out, cfg)}")
    if world > 1:
        import torch.distributed as dist

        dist.barrier(group=group)  # no rank exits (and gets the job killed) while rank 0 is still writing
    model._ds_quant_finished = True
    return out


# -- MEASURE / QUANTIZE makers -------------------------------------------------------------------------
def _measured_maker(cfg: QuantConfig):
    def make(module: nn.Module, fqn: str) -> MeasuredLinear:
        return MeasuredLinear.from_original(module, fqn, cfg)

    return make


def _measured_experts_maker(cfg: QuantConfig):
    def make(module: nn.Module, fqn: str) -> MeasuredExperts:
        return MeasuredExperts.from_original(module, fqn, cfg)

    return make


def fp8_maker(cfg: QuantConfig, targets: list[tuple[str, nn.Module]]):
    return _fp8_makers(cfg, targets, [])[0]


def _fp8_makers(cfg: QuantConfig, targets: list[tuple[str, nn.Module]], experts: list[tuple[str, nn.Module]]):
    """(linear maker, experts maker) for QUANTIZE."""
    # Only static activation scales need measurements (unit_scale and dynamic per-token do not).
    measured = [(fqn, m) for fqn, m in targets if RECIPES[cfg.method_for(fqn)].needs_measurements]
    measured_experts = [(fqn, m) for fqn, m in experts if RECIPES[cfg.method_for(fqn)].needs_measurements]
    if not measured and not measured_experts:
        return (lambda module, fqn: Fp8Linear.from_original(module, fqn, cfg, None),
                lambda module, fqn: Fp8Experts.from_original(module, fqn, cfg, None))
    rank, world, _ = tp_position(TPLayout.of(m) for _, m in measured)
    doc, where = measurements.load_for_quantize(cfg.dump_stats_path, rank, world)
    # Validate every layer before swapping any: a failure leaves the model untouched.
    wanted = {fqn: TPLayout.of(m).full_shape(*m.weight.shape) for fqn, m in measured}
    for fqn, m in measured_experts:
        wanted.update(expert_shapes(m, fqn))
    measurements.check_layers(doc, where, wanted)
    get_logger().info(f"QUANTIZE with measurements from {where} (measured at world size {doc['world_size']})")
    with_records = {fqn for fqn, _ in measured_experts}
    return (lambda module, fqn: Fp8Linear.from_original(module, fqn, cfg, doc["layers"].get(fqn) if fqn in wanted
                                                        else None),
            lambda module, fqn: Fp8Experts.from_original(module, fqn, cfg, doc["layers"] if fqn in with_records
                                                         else None))


# -- helpers for the above -------------------------------------------------------------------------------
def tp_position(items) -> tuple[int, int, object]:
    """(tp rank, tp size, group) of the first tensor-parallel layer; (0, 1, None) if there is none."""
    for item in items:
        layout = item.layout if isinstance(item, _TwinLinear) else item
        if layout.tp_size > 1:
            return layout.tp_rank, layout.tp_size, layout.mp_group
    return 0, 1, None


def _log_outcome(model: nn.Module, cfg: QuantConfig, report) -> None:
    log = get_logger()
    skipped = skipped_tp_layers(model)
    for fqn, _, reason in skipped:
        log.info(f"left in high precision: {fqn}: {reason}")
    fallbacks, backends = {}, {}
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            if m.fallback_reason:
                fallbacks.setdefault(m.fallback_reason, []).append(m.name)
            else:
                backends.setdefault(m.gemm_plan(), []).append(m.name)
    for reason, names in fallbacks.items():
        log.info(f"{len(names)} layer(s) run the pure-torch reference FP8 GEMM ({reason}): "
                 f"{', '.join(names[:4])}{' ...' if len(names) > 4 else ''}")
    if current_rank() == 0:
        for plan, names in backends.items():
            log.info(f"FP8 GEMM of {len(names)} layer(s): {plan}")
        n_experts = sum(r.new_type.endswith("Experts") for r in report)
        log.info(f"{cfg.mode.value}: patched {len(report) - n_experts} linear layer(s)"
                 + (f" and {n_experts} fused-experts block(s)" if n_experts else "") + f" ({cfg.source})"
                 + (f"; left in high precision: {format_skipped(skipped)}" if skipped else ""))
        if verbose():
            print(format_report(report), flush=True)


def _save_at_exit(model: nn.Module) -> None:
    """Scripts that never call finish_measurements still get their measurements at interpreter exit."""
    ref = weakref.ref(model)

    def finish() -> None:
        m = ref()
        if m is None or getattr(m, "_ds_quant_finished", False):
            return  # the script saved them itself
        measured = [x for x in m.modules() if isinstance(x, MeasuredLinear)]
        if not measured and not any(isinstance(x, MeasuredExperts) for x in m.modules()):
            return
        import torch.distributed as dist

        if any(x.layout.tp_size > 1 for x in measured) and not (dist.is_available() and dist.is_initialized()):
            get_logger().warning("exit: the process group is gone, cannot gather shards; call "
                                 "ds_quant.finish_measurements(model) before destroying it")
            return
        with torch.no_grad():
            finish_measurements(m)

    atexit.register(finish)
