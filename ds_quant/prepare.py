"""Public entry points: `prep_model` (MEASURE or QUANTIZE a model) and `finish_measurements`."""

from __future__ import annotations

import functools
import os

from torch import nn

from .config import Mode, QuantConfig, resolve_config
from .errors import ConfigError
from .layers.experts import _TwinExperts
from .layers.linear import Fp8Linear, _TwinLinear
from .layers.patch import (
    find,
    format_report,
    format_skipped,
    make_experts_filter,
    make_filter,
    skipped_tp_layers,
    swap,
)
from .layers.state import state_of
from .log import current_rank, get_logger, rank0_progress, verbose
from .workflows import hf_model, kv_attention
from .workflows import load as fp8_load
from .workflows.measure import (
    measured_experts_maker,
    measured_maker,
    save_at_exit,
    start_measure,
)
from .workflows.quantize import fp8_makers, load_measurements


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
    if hf_model.pending(model) is not None:  # from_pretrained of an FP8 folder built it on meta (load.py)
        if cfg.mode is not Mode.QUANTIZE:
            raise ConfigError(f"{cfg.source}: an FP8 checkpoint holds no bf16 weights to {cfg.mode.value}")
        if cfg.smooth_alpha is not None:  # its FP8 weights were quantized (or are being) without folding
            raise ConfigError(f"{cfg.source}: key 'smooth_alpha' applies to in-memory QUANTIZE of a bf16 model, not to "
                              "FP8 checkpoints or quantize-on-load; drop it, or quantize the bf16 model in memory")
        if cfg.gptq is not None:
            raise ConfigError(f"{cfg.source}: key 'gptq' applies to in-memory QUANTIZE of a bf16 model, not to FP8 "
                              "checkpoints or quantize-on-load; drop it, or quantize the bf16 model in memory")
        model, report = fp8_load.load_pending(model, cfg)
        _log_outcome(model, cfg, report)
        state_of(model, create=True).config = cfg
        return model
    hf_model.refuse_compressed(model)
    if any(isinstance(m, (_TwinLinear, _TwinExperts)) for m in model.modules()):
        raise RuntimeError("this model was already prepared by ds_quant; prepare the original model once")
    targets = find(model, make_filter(functools.partial(cfg.selects, "linear")))
    experts = find(model, make_experts_filter(functools.partial(cfg.selects, "experts")))
    if cfg.mode is Mode.MEASURE:
        run = start_measure(cfg, model, targets)
        make, make_experts = measured_maker(cfg), measured_experts_maker(cfg)
    else:
        make, make_experts = fp8_makers(cfg, targets, experts, model)
    def progress(items):
        return rank0_progress(items, f"ds_quant {cfg.mode.value}", unit="layer", min_items=8)

    model, report = swap(model, targets, make, progress=progress)
    model, experts_report = swap(model, experts, make_experts)
    report += experts_report
    _log_outcome(model, cfg, report)
    load = functools.lru_cache(maxsize=1)(lambda: load_measurements(cfg, model))  # read once, if at all
    kv_attention.install(model, cfg, load)
    state = state_of(model, create=True)
    state.config = cfg
    if cfg.mode is Mode.MEASURE:
        state.run = run
        save_at_exit(model)
    return model


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


