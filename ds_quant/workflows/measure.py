"""MEASURE: swap in measured twins, then gather, merge and write their statistics."""

from __future__ import annotations

import atexit
import weakref

import torch
from torch import nn

from ..config import Observer, QuantConfig
from ..files import hessians, shards, tensor_dump
from ..files.tables import write_workbook_from_files as write_from_files
from ..files.tensor_dump import TensorDump
from ..layers import attention, kv_cache
from ..layers.experts import MeasuredExperts
from ..layers.linear import MeasuredLinear
from ..layers.patch import model_tp, tp_position
from ..layers.state import state_of
from ..log import current_rank, get_logger
from ..numerics import layer_spec
from ..parallel import dist
from ..parallel.dist import talk_group
from ..parallel.tp import TPLayout


def finish_measurements(model: nn.Module) -> str | None:
    """Write this rank's shard and, on TP rank 0, the merged model-level file. Collective over the TP
    group: every rank must call it. Returns the merged file's path on rank 0."""
    state = state_of(model)
    cfg: QuantConfig | None = None if state is None else state.config
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
        run = state.run
        hpath = dist.agree(lambda: hessians.write(cfg.dump_stats_path, with_h, run) if rank == 0 else None,
                           talk_group(group, world), what="MEASURE: writing the Hessians (gptq)")
        if hpath:
            log.info(f"wrote {hpath} (input Hessians of {len(with_h)} layers, for gptq)")
    log.info(f"wrote {shards.shard_path(cfg.dump_stats_path, rank, world)}"
             + (f" and merged {out} ({len(layers)} layers" + (f", {len(kv)} KV caches)" if kv else ")") if out else ""))
    dump = next((m.dump for m in measured.values() if m.dump is not None), None)
    if dump is not None:
        run = state.run
        path = dist.agree(lambda: dump.write(cfg.dump_stats_path, rank, world, run), talk_group(group, world),
                          what="MEASURE: writing this rank's tensor dump")
        log.info(f"wrote {path} ({len(dump.tensors)} tensors, {dump.saved_bytes / 2**20:.2f} MiB)")
    if cfg.dump_stats_xlsx_path and out:
        log.info(f"wrote statistics workbook {write_from_files(cfg.dump_stats_xlsx_path, out, cfg)}")
    dist.barrier(talk_group(group, world))  # no rank exits (and gets the job killed) while rank 0 is still writing
    state.finished = True
    return out


def _save(model: nn.Module, layers: dict, cfg: QuantConfig, rank: int, world: int, group, dtype: str,
          kv: dict | None = None, attn: dict | None = None) -> str | None:
    """Every rank writes its shard; the shards are gathered (no shared filesystem needed) and TP rank 0 writes
    the merged file. Errors agree: every rank raises the same one."""
    prefix, run = cfg.dump_stats_path, state_of(model).run
    g = talk_group(group, world)
    shard = dist.agree(lambda: shards.write_shard(layers, prefix, rank, world, cfg.observer.value, dtype, run,
                                                                kv, attn),
                       g, what="MEASURE: writing this rank's shard")
    gathered = dist.all_gather_objects(shard, g)
    return dist.agree(lambda: shards.write_merged(gathered, prefix) if rank == 0 else None, g,
                      what="MEASURE: merging the shards")


def start_measure(cfg: QuantConfig, model: nn.Module, targets) -> str:
    """Before calibration: the dump path is writable with room to spare on every rank, files of an earlier run
    under the same prefix are gone (a run that dies cannot leave them for QUANTIZE to mistake for its own), and
    every rank holds the same run id, stamped on its shard. Returns the run id."""
    import uuid

    rank, world, group = tp_position(TPLayout.of(m) for _, m in targets) if targets else model_tp(model)
    g = talk_group(group, world)
    widths = [TPLayout.of(m).full_shape(*m.weight.shape)[1] for _, m in targets]

    def check() -> list[str]:
        shards.check_writable(cfg.dump_stats_path, shards.estimated_bytes(widths))
        return shards.remove_previous(cfg.dump_stats_path, rank) + \
            tensor_dump.remove_previous(cfg.dump_stats_path, rank) + \
            (hessians.remove_previous(cfg.dump_stats_path) if rank == 0 else [])

    gone = dist.agree(check, g, what="MEASURE")
    if gone:
        get_logger().info(f"removed the previous run's {', '.join(gone)}")
    return dist.broadcast_object(uuid.uuid4().hex[:16], 0, g)


# -- MEASURE / QUANTIZE makers -------------------------------------------------------------------------
def measured_maker(cfg: QuantConfig):
    dump = TensorDump(cfg.save_max_bytes) if cfg.observer is Observer.SAVE else None  # one budget per rank

    def make(module: nn.Module, fqn: str) -> MeasuredLinear:
        m = MeasuredLinear.from_original(module, fqn, layer_spec.resolve(cfg, fqn))
        m.dump = dump
        return m

    return make


def measured_experts_maker(cfg: QuantConfig):
    def make(module: nn.Module, fqn: str) -> MeasuredExperts:
        return MeasuredExperts.from_original(module, fqn, layer_spec.resolve(cfg, fqn, "experts"))

    return make


def save_at_exit(model: nn.Module) -> None:
    """Scripts that never call finish_measurements still get their measurements at interpreter exit."""
    ref = weakref.ref(model)

    def finish() -> None:
        m = ref()
        if m is None or getattr(state_of(m), "finished", False):
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
