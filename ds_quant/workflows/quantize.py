"""QUANTIZE: each layer's quantized weight and scales, from the measurements (in memory, from a bf16
folder read in row blocks, or for `ds-quant convert`)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import QuantConfig
from ..files import hessians, measurements, shards
from ..files.checkpoint import Fp8Layer
from ..files.safetensors import SafetensorsFolder, fresh_tensor, release_freed_memory
from ..layers.experts import Fp8Experts, expert_shapes
from ..layers.linear import Fp8Linear
from ..layers.patch import model_tp, tp_position
from ..log import get_logger
from ..numerics import layer_spec, weights
from ..parallel import dist
from ..parallel.dist import talk_group
from ..parallel.tp import TPLayout
from .smooth import fold_for_quantize


def fp8_maker(cfg: QuantConfig, targets: list[tuple[str, nn.Module]]):
    return fp8_makers(cfg, targets, [])[0]


def fp8_makers(cfg: QuantConfig, targets: list[tuple[str, nn.Module]], experts: list[tuple[str, nn.Module]],
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
    g = talk_group(group, world)
    doc, where = read_measurements(cfg.dump_stats_path, world, g)
    # Validate every layer before swapping any: a failure leaves the model untouched.
    wanted = {fqn: TPLayout.of(m).full_shape(*m.weight.shape) for fqn, m in measured}
    for fqn, m in measured_experts:
        wanted.update(expert_shapes(m, fqn))
    dist.agree(lambda: measurements.check_layers(doc, where, wanted), g, what="QUANTIZE")
    get_logger().info(f"QUANTIZE with measurements from {where} (measured at world size {doc['world_size']})")
    if cfg.smooth_alpha is not None:
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
        found = dist.agree(lambda: hessians.read(cfg.dump_stats_path, wanted, run), talk_group(group, world),
                           what="QUANTIZE gptq")
        get_logger().info(f"gptq: rounding the weights of {len(wanted)} layer(s) with the Hessians of {found.path}")
        return lambda fqn: found.get(fqn) if fqn in wanted else None

    return load


def read_measurements(prefix: str, world: int, group) -> tuple[dict, str]:
    """The model-level measurements, read once and shared: the first rank that has the merged file reads and
    validates it and broadcasts it, so other nodes need no copy; without one, each shard is read by the first
    rank that has it and every rank merges the same set. Any failure (missing, truncated, corrupt, foreign) is
    raised on every rank, the same one line. Collective over `group`."""
    seen = dist.all_gather_objects(shards.local_sources(prefix), group)
    what, plan, where = dist.agree(lambda: shards.read_plan(prefix, seen, world), group, what="QUANTIZE")
    me = dist.group_rank(group)
    docs = dist.agree(lambda: [measurements.load(p) for p in plan.get(me, [])], group, what="QUANTIZE")
    if what == "merged":
        return dist.broadcast_object(docs[0] if docs else None, next(iter(plan)), group), where
    gathered = [d for part in dist.all_gather_objects(docs, group) for d in part]
    return dist.agree(lambda: measurements.merge(gathered, where=where), group, what="QUANTIZE"), where


def load_measurements(cfg: QuantConfig, model: nn.Module) -> tuple[dict, str]:
    _, world, group = model_tp(model)
    return read_measurements(cfg.dump_stats_path, world, talk_group(group, world))


# The DeepSpeed class a measured kind came from, so a config's `types` lists select the same layers here.
_KIND_TYPE = {"column": "LinearLayer", "row": "LinearAllreduce", "lm-head": "LmHeadLinearAllreduce"}


def selected_by_lists(cfg: QuantConfig, fqn: str, kind: str | None) -> bool:
    """A linear known only by its measured record (no module at hand), selected as `make_filter` would the module."""
    return cfg.selects("linear", {"Linear"} | ({_KIND_TYPE[kind]} if kind in _KIND_TYPE else set()), fqn)


def quantize_linear(name: str, w_hp: torch.Tensor, spec: layer_spec.LayerSpec, record: dict | None,
                    hessian: torch.Tensor | None = None):
    """(Fp8Layer with its scales, the FP8 weight) of one whole linear under its `spec`
    (`layer_spec.resolve(config, name)`): the one weight path, as in-memory QUANTIZE gives it at any TP size (its
    statistics are reduced over the ranks to the whole tensor's); with `hessian` (config `gptq`) rounded by GPTQ."""
    q = weights.quantize_weight(w_hp, layer_spec.require_spec(spec, "quantize_linear"), record, hessian, name=name)
    return Fp8Layer(name, tuple(w_hp.shape), q.w_scale, q.input_scale), q.w_q


class QuantizingFolder(SafetensorsFolder):
    """A bf16 folder read as if it were an FP8 one (quantize-on-load): `layers[fqn]` gives a linear's scales
    (computed from the whole weight, read in row blocks), `read(fqn.weight, rows, cols)` this rank's FP8 piece,
    cast block by block; only the FP8 shard stays."""

    def __init__(self, folder, rename, cfg: QuantConfig, wanted: dict[str, tuple[int, int]], dtype: torch.dtype,
                 expert_records: dict[str, tuple[int, int]] | None = None):
        """`expert_records`: the measurement records (name -> shape) of the fused experts to quantize too."""
        super().__init__(folder, rename)
        self.cfg, self.dtype = cfg, dtype
        self.specs = {fqn: layer_spec.resolve(cfg, fqn) for fqn in wanted}
        self.act_limit = layer_spec.resolve(cfg, "").fp8_max  # the config's FP8 format and device profile
        doc, _ = checked_measurements(cfg, wanted, expert_records)
        self.records = doc["layers"] if doc else {}
        self.layers = _Lazy(self, wanted)
        self._last: tuple[str, Fp8Layer, torch.Tensor | None] | None = None

    def quantized(self, fqn: str) -> Fp8Layer:
        """The layer's scales: with a weight search the whole weight is read and quantized (and kept until the
        next layer); otherwise its row blocks are read once for the maxima, and `read` casts only the rows and
        columns asked for (this rank's), block by block: the bf16 weight is never whole in memory."""
        if self._last is None or self._last[0] != fqn:
            self._last = None  # free the previous layer first
            release_freed_memory()
            key, record, spec = f"{fqn}.weight", self.records.get(fqn), self.specs[fqn]
            if spec.recipe.weight_opt:
                w_hp = SafetensorsFolder.read(self, key).to(self.dtype)
                self._last = (fqn, *quantize_linear(fqn, w_hp, spec, record))
            else:
                n, k = self.shape(key)
                step = self._step(k)
                rows = weights.RowBlocks(lambda: (SafetensorsFolder.read(self, key, slice(i, min(i + step, n)))
                                                  .to(self.dtype) for i in range(0, max(n, 1), step)), (n, k))
                q = weights.quantize_weight(rows, spec, record, name=fqn)
                self._last = (fqn, Fp8Layer(fqn, (n, k), q.w_scale, q.input_scale), None)
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
        local = fresh_tensor((sum(max(0, b - a) for a, b in parts), max(0, c1 - c0)), self.specs[fqn].fp8_dtype)
        at, step = 0, self._step(k)
        for a, b in parts:
            for i in range(a, b, step):
                m = min(step, b - i)
                if w is not None:
                    local[at:at + m] = w[i:i + m, c0:c1]
                else:
                    blk = SafetensorsFolder.read(self, key, slice(i, i + m), cols).to(self.dtype)
                    local[at:at + m] = weights.cast_rows(blk, layer.weight_scale, i, self.specs[fqn])
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


def checked_measurements(cfg: QuantConfig, linears: dict[str, tuple[int, int]], expert_records: dict | None = None):
    """The merged measurements, checked for the linears whose method needs them and for `expert_records` (the
    per-expert records, name -> shape, of the experts blocks whose method needs them); (None, None) if none do."""
    needs = [n for n in linears if layer_spec.resolve(cfg, n).needs_measurements]
    if not needs and not expert_records:
        return None, None
    doc, where = shards.read_local(cfg.dump_stats_path)
    wanted = {n: linears[n] for n in needs if selected_by_lists(cfg, n, doc["layers"].get(n, {}).get("kind"))}
    wanted.update(expert_records or {})
    measurements.check_layers(doc, where, wanted)
    return doc, where

