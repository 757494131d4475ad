"""Public entry points: `prep_model` (MEASURE or QUANTIZE a model) and `finish_measurements`."""

from __future__ import annotations

import atexit
import functools
import os
import weakref

import torch
from torch import nn

from . import attention, dist, hessians, kv_cache, layer_spec, measurements, tensor_dump
from . import load as fp8_load
from .config import ConfigError, Mode, Observer, QuantConfig, resolve_config
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
from .tensor_dump import TensorDump
from .tp import TPLayout, spec_of

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
        if cfg.smooth_alpha is not None:  # its FP8 weights were quantized (or are being) without folding
            raise ConfigError(f"{cfg.source}: key 'smooth_alpha' applies to in-memory QUANTIZE of a bf16 model, not to "
                              "FP8 checkpoints or quantize-on-load; drop it, or quantize the bf16 model in memory")
        if cfg.gptq is not None:
            raise ConfigError(f"{cfg.source}: key 'gptq' applies to in-memory QUANTIZE of a bf16 model, not to FP8 "
                              "checkpoints or quantize-on-load; drop it, or quantize the bf16 model in memory")
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
        run = _start_measure(cfg, model, targets)
        make, make_experts = _measured_maker(cfg), _measured_experts_maker(cfg)
    else:
        make, make_experts = _fp8_makers(cfg, targets, experts, model)
    def progress(items):
        return rank0_progress(items, f"ds_quant {cfg.mode.value}", unit="layer", min_items=8)

    model, report = swap(model, targets, make, progress=progress)
    model, experts_report = swap(model, experts, make_experts)
    report += experts_report
    _log_outcome(model, cfg, report)
    load = functools.lru_cache(maxsize=1)(lambda: _load_measurements(cfg, model))  # read once, if at all
    kv_cache.install(model, cfg, load)
    attention.install(model, cfg, load)
    setattr(model, _CONFIG_ATTR, cfg)
    if cfg.mode is Mode.MEASURE:
        model._ds_quant_run = run
        _save_at_exit(model)
    return model


def finish_measurements(model: nn.Module) -> str | None:
    """Write this rank's shard and, on TP rank 0, the merged model-level file. Collective over the TP
    group: every rank must call it. Returns the merged file's path on rank 0."""
    cfg: QuantConfig | None = getattr(model, _CONFIG_ATTR, None)
    measured = {n: m for n, m in model.named_modules() if isinstance(m, MeasuredLinear)}
    measured_experts = [m for m in model.modules() if isinstance(m, MeasuredExperts)]
    kv, attn = kv_cache.records(model), attention.records(model)
    if cfg is None or not (measured or measured_experts or kv_cache.plan_of(model) or attention.sites_of(model)):
        raise RuntimeError("finish_measurements: this model was not prepared in MEASURE mode by ds_quant.prep_model")
    rank, world, group = tp_position(measured.values()) if measured else model_tp(model)
    if world == 1 and current_rank() != 0:
        return None  # a replicated single-rank model: one writer is enough
    layers = {n: m.stats() for n, m in measured.items()}
    for m in measured_experts:  # one plain record per expert projection (experts are whole on every rank)
        layers.update(m.stats())
    dtype = str(next(iter(measured.values())).weight.dtype if measured else measured_experts[0].gate_up_proj.dtype
                if measured_experts else next(model.parameters()).dtype).replace("torch.", "")
    log = get_logger()
    bad = {n: r["nonfinite_inputs"] for n, r in layers.items() if r.get("nonfinite_inputs")}
    if bad:
        worst = sorted(bad.items(), key=lambda kv: -kv[1])
        log.warning(f"MEASURE: {len(bad)} layer(s) saw NaN/Inf inputs, left out of their statistics (counted in the "
                    f"file as nonfinite_inputs): " + ", ".join(f"{n} ({c})" for n, c in worst[:5])
                    + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    out = _save(model, layers, cfg, rank, world, group, dtype, kv, attn)
    with_h = {n: (m.hessian.hessian, m.hessian.tokens) for n, m in measured.items()
              if m.hessian is not None and m.hessian.keep}
    if any(m.hessian is not None for m in measured.values()):
        run = getattr(model, "_ds_quant_run", None)
        hpath = dist.agree(lambda: hessians.write(cfg.dump_stats_path, with_h, run) if rank == 0 else None,
                           _group(group, world), what="MEASURE: writing the Hessians (gptq)")
        if hpath:
            log.info(f"wrote {hpath} (input Hessians of {len(with_h)} layers, for gptq)")
    log.info(f"wrote {measurements.shard_path(cfg.dump_stats_path, rank, world)}"
             + (f" and merged {out} ({len(layers)} layers" + (f", {len(kv)} KV caches)" if kv else ")") if out else ""))
    dump = next((m.dump for m in measured.values() if m.dump is not None), None)
    if dump is not None:
        run = getattr(model, "_ds_quant_run", None)
        path = dist.agree(lambda: dump.write(cfg.dump_stats_path, rank, world, run), _group(group, world),
                          what="MEASURE: writing this rank's tensor dump")
        log.info(f"wrote {path} ({len(dump.tensors)} tensors, {dump.saved_bytes / 2**20:.2f} MiB)")
    if cfg.dump_stats_xlsx_path and out:
        from .workbook import write_from_files

        log.info(f"wrote statistics workbook {write_from_files(cfg.dump_stats_xlsx_path, out, cfg)}")
    dist.barrier(_group(group, world))  # no rank exits (and gets the job killed) while rank 0 is still writing
    model._ds_quant_finished = True
    return out


def _group(group, world: int):
    """The TP group to talk over; `dist.LOCAL` (no communication) for a model that is not tensor-parallel."""
    return group if world > 1 else dist.LOCAL


def _save(model: nn.Module, layers: dict, cfg: QuantConfig, rank: int, world: int, group, dtype: str,
          kv: dict | None = None, attn: dict | None = None) -> str | None:
    """Every rank writes its shard; the shards are gathered (no shared filesystem needed) and TP rank 0 writes
    the merged file. Errors agree: every rank raises the same one."""
    prefix, run = cfg.dump_stats_path, getattr(model, "_ds_quant_run", None)
    g = _group(group, world)
    shard = dist.agree(lambda: measurements.write_shard(layers, prefix, rank, world, cfg.observer.value, dtype, run,
                                                                kv, attn),
                       g, what="MEASURE: writing this rank's shard")
    shards = dist.all_gather_objects(shard, g)
    return dist.agree(lambda: measurements.write_merged(shards, prefix) if rank == 0 else None, g,
                      what="MEASURE: merging the shards")


def _start_measure(cfg: QuantConfig, model: nn.Module, targets) -> str:
    """Before calibration: the dump path is writable with room to spare on every rank, files of an earlier run
    under the same prefix are gone (a run that dies cannot leave them for QUANTIZE to mistake for its own), and
    every rank holds the same run id, stamped on its shard. Returns the run id."""
    import uuid

    rank, world, group = tp_position(TPLayout.of(m) for _, m in targets) if targets else model_tp(model)
    g = _group(group, world)
    widths = [TPLayout.of(m).full_shape(*m.weight.shape)[1] for _, m in targets]

    def check() -> list[str]:
        measurements.check_writable(cfg.dump_stats_path, measurements.estimated_bytes(widths))
        return measurements.remove_previous(cfg.dump_stats_path, rank) + \
            tensor_dump.remove_previous(cfg.dump_stats_path, rank) + \
            (hessians.remove_previous(cfg.dump_stats_path) if rank == 0 else [])

    gone = dist.agree(check, g, what="MEASURE")
    if gone:
        get_logger().info(f"removed the previous run's {', '.join(gone)}")
    return dist.broadcast_object(uuid.uuid4().hex[:16], 0, g)


# -- MEASURE / QUANTIZE makers -------------------------------------------------------------------------
def _measured_maker(cfg: QuantConfig):
    dump = TensorDump(cfg.save_max_bytes) if cfg.observer is Observer.SAVE else None  # one budget per rank

    def make(module: nn.Module, fqn: str) -> MeasuredLinear:
        m = MeasuredLinear.from_original(module, fqn, layer_spec.resolve(cfg, fqn))
        m.dump = dump
        return m

    return make


def _measured_experts_maker(cfg: QuantConfig):
    def make(module: nn.Module, fqn: str) -> MeasuredExperts:
        return MeasuredExperts.from_original(module, fqn, layer_spec.resolve(cfg, fqn, "experts"))

    return make


def fp8_maker(cfg: QuantConfig, targets: list[tuple[str, nn.Module]]):
    return _fp8_makers(cfg, targets, [])[0]


def _fp8_makers(cfg: QuantConfig, targets: list[tuple[str, nn.Module]], experts: list[tuple[str, nn.Module]],
                model: nn.Module | None = None):
    """(linear maker, experts maker) for QUANTIZE; with `smooth_alpha`, `model` is smoothed in place first."""
    # Only static activation scales need measurements (unit_scale and dynamic per-token do not).
    # Each layer's numbers: its LayerSpec, resolved here once per layer; the twins never read the config.
    specs = {fqn: layer_spec.resolve(cfg, fqn) for fqn, _ in targets}
    specs_experts = {fqn: layer_spec.resolve(cfg, fqn, "experts") for fqn, _ in experts}

    def spec(fqn: str) -> layer_spec.LayerSpec:
        return specs[fqn] if fqn in specs else layer_spec.resolve(cfg, fqn)

    def experts_spec(fqn: str) -> layer_spec.LayerSpec:
        return specs_experts[fqn] if fqn in specs_experts else layer_spec.resolve(cfg, fqn, "experts")

    measured = [(fqn, m) for fqn, m in targets if specs[fqn].needs_measurements]
    measured_experts = [(fqn, m) for fqn, m in experts if specs_experts[fqn].needs_measurements]
    hess = _hessians(cfg, targets, specs)
    if not measured and not measured_experts:
        hess = hess(None)
        return (lambda module, fqn: Fp8Linear.from_original(module, fqn, spec(fqn), None, hess(fqn)),
                lambda module, fqn: Fp8Experts.from_original(module, fqn, experts_spec(fqn), None))
    rank, world, group = tp_position(TPLayout.of(m) for _, m in measured)
    g = _group(group, world)
    doc, where = read_measurements(cfg.dump_stats_path, world, g)
    # Validate every layer before swapping any: a failure leaves the model untouched.
    wanted = {fqn: TPLayout.of(m).full_shape(*m.weight.shape) for fqn, m in measured}
    for fqn, m in measured_experts:
        wanted.update(expert_shapes(m, fqn))
    dist.agree(lambda: measurements.check_layers(doc, where, wanted), g, what="QUANTIZE")
    get_logger().info(f"QUANTIZE with measurements from {where} (measured at world size {doc['world_size']})")
    if cfg.smooth_alpha is not None:
        from .smooth import fold_for_quantize

        doc = {**doc, "layers": fold_for_quantize(model, doc["layers"], cfg, g)}
    with_records = {fqn for fqn, _ in measured_experts}
    hess = hess(doc.get("run"))
    return (lambda module, fqn: Fp8Linear.from_original(module, fqn, spec(fqn),
                                                        doc["layers"].get(fqn) if fqn in wanted else None,
                                                        hess(fqn)),
            lambda module, fqn: Fp8Experts.from_original(module, fqn, experts_spec(fqn),
                                                         doc["layers"] if fqn in with_records else None))


def _hessians(cfg: QuantConfig, targets: list[tuple[str, nn.Module]], specs: dict):
    """config `gptq`: a function of the measurement file's run id (None: not read) that checks the Hessian file
    (every rank reads its own copy; ranks agree on errors) and returns {layer -> its Hessian, or None}."""
    gptq = [(fqn, m) for fqn, m in targets if specs[fqn].gptq is not None]
    if not gptq:
        return lambda run: (lambda fqn: None)

    def load(run: str | None):
        _, world, group = tp_position(TPLayout.of(m) for _, m in gptq)
        wanted = {fqn: TPLayout.of(m).full_shape(*m.weight.shape)[1] for fqn, m in gptq}
        found = dist.agree(lambda: hessians.read(cfg.dump_stats_path, wanted, run), _group(group, world),
                           what="QUANTIZE gptq")
        get_logger().info(f"gptq: rounding the weights of {len(wanted)} layer(s) with the Hessians of {found.path}")
        return lambda fqn: found.get(fqn) if fqn in wanted else None

    return load


def read_measurements(prefix: str, world: int, group) -> tuple[dict, str]:
    """The model-level measurements, read once and shared: the first rank that has the merged file reads and
    validates it and broadcasts it, so other nodes need no copy; without one, each shard is read by the first
    rank that has it and every rank merges the same set. Any failure (missing, truncated, corrupt, foreign) is
    raised on every rank, the same one line. Collective over `group`."""
    seen = dist.all_gather_objects(measurements.local_sources(prefix), group)
    what, plan, where = dist.agree(lambda: measurements.read_plan(prefix, seen, world), group, what="QUANTIZE")
    me = dist.group_rank(group)
    docs = dist.agree(lambda: [measurements.load(p) for p in plan.get(me, [])], group, what="QUANTIZE")
    if what == "merged":
        return dist.broadcast_object(docs[0] if docs else None, next(iter(plan)), group), where
    shards = [d for part in dist.all_gather_objects(docs, group) for d in part]
    return dist.agree(lambda: measurements.merge(shards, where=where), group, what="QUANTIZE"), where


# -- helpers for the above -------------------------------------------------------------------------------
def model_tp(model: nn.Module) -> tuple[int, int, object]:
    """(tp rank, tp size, group) from the model's DeepSpeed TP layers, patched or not."""
    return tp_position(m.layout if isinstance(m, _TwinLinear) else TPLayout.of(m) for m in model.modules()
                       if isinstance(m, _TwinLinear) or spec_of(m) is not None)


def _load_measurements(cfg: QuantConfig, model: nn.Module) -> tuple[dict, str]:
    _, world, group = model_tp(model)
    return read_measurements(cfg.dump_stats_path, world, _group(group, world))


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
        if not measured and not any(isinstance(x, MeasuredExperts) for x in m.modules()) and \
                kv_cache.plan_of(m) is None:
            return
        import torch.distributed as tdist

        if any(x.layout.tp_size > 1 for x in measured) and not (tdist.is_available() and tdist.is_initialized()):
            get_logger().warning("exit: the process group is gone, cannot gather shards; call "
                                 "ds_quant.finish_measurements(model) before destroying it")
            return
        with torch.no_grad():
            finish_measurements(m)
        # The script is over, and this handler just ran collectives: end the process group in order now (barrier,
        # destroy), or a gloo thread still holding the last gather can abort the finalising interpreter
        # ("terminate called without an active exception", rc -6 on a rank) after a run that succeeded.
        dist.shutdown()

    atexit.register(finish)
