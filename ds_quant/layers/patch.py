"""One swap function, the allow/block filter, and the patched-modules report."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..parallel.tp import PLAIN, TPLayout, spec_of, unhandled_tp_reason
from .experts import (
    _TwinExperts,
    experts_unsupported_reason,
    is_fused_experts,
)
from .linear import _TwinLinear

Filter = Callable[[nn.Module, str], bool]
# (the type names the allow/block lists know a module by, its name) -> selected? Built by the caller from the config
# (`functools.partial(cfg.selects, "linear")`): layers never read the config.
Selects = Callable[[set[str], str], bool]


@dataclass(frozen=True)
class Swapped:
    name: str
    old_type: str
    new_type: str
    gemm: str = ""  # FP8 twins: which backend of ds_quant.ops serves them, per M


def make_filter(selects: Selects) -> Filter:
    """Supported linears that `selects` (the caller's allow/block rule: `QuantConfig.selects` for "linear") keeps."""

    def keep(module: nn.Module, fqn: str) -> bool:
        spec = spec_of(module)
        if spec is None:
            return False
        # A checked nn.Linear subclass (FalconLinear) is also a "Linear" to the type lists.
        return selects({type(module).__name__} | ({"Linear"} if spec is PLAIN else set()), fqn)

    return keep


def make_experts_filter(selects: Selects) -> Filter:
    """Fused MoE experts (experts.py) that `selects` keeps, by their class name (e.g. MixtralExperts)."""

    def keep(module: nn.Module, fqn: str) -> bool:
        return is_fused_experts(module) and selects({type(module).__name__}, fqn)

    return keep


def find(model: nn.Module, filter_fn: Filter) -> list[tuple[str, nn.Module]]:
    """The modules `filter_fn` keeps, except MoE routers (see `routers`)."""
    keep_hp = routers(model)
    return [(fqn, m) for fqn, m in model.named_modules() if filter_fn(m, fqn) and fqn not in keep_hp]


ROUTER_REASON = "MoE router: kept in high precision on purpose (an FP8 router would change which experts run)"


def routers(model: nn.Module) -> set[str]:
    """Names of MoE routers: an nn.Linear beside an `experts` child with one output per expert (transformers
    4.x: `block_sparse_moe.gate` beside an `experts` ModuleList; transformers 5's routers are no nn.Linear)."""
    found = set()
    for fqn, m in model.named_modules():
        experts = m._modules.get("experts")
        if experts is None:
            continue
        n = len(experts) if isinstance(experts, nn.ModuleList) else getattr(experts, "num_experts", None)
        for name, child in m.named_children():
            if isinstance(child, nn.Linear) and name != "experts" and child.out_features == n:
                found.add(f"{fqn}.{name}" if fqn else name)
    return found


def swap(model: nn.Module, targets: list[tuple[str, nn.Module]],
         make: Callable[[nn.Module, str], nn.Module], progress=None) -> tuple[nn.Module, list[Swapped]]:
    """Replace each target by `make(module, fqn)`, one at a time (peak memory: one layer's copy).
    Returns the model (a new object only if the model itself was a target) and what was swapped."""
    report = []
    for fqn, module in targets if progress is None else progress(targets):
        new = make(module, fqn)
        gemm = new.gemm_plan() if hasattr(new, "gemm_plan") else ""
        report.append(Swapped(fqn, type(module).__name__, type(new).__name__, gemm))
        if fqn == "":
            model = new
        else:
            parent_name, _, child = fqn.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
    return model, report


def skipped_tp_layers(model: nn.Module) -> list[tuple[str, str, str]]:
    """DeepSpeed TP layers, nn.Linear subclasses, holders of >= 3-D weights and MoE routers that stay in high
    precision: (name, class, reason)."""
    keep_hp = routers(model)
    return [(fqn, type(m).__name__, r) for fqn, m in model.named_modules()
            if (r := (ROUTER_REASON if fqn in keep_hp else None) or unhandled_tp_reason(m)
                or unhandled_weights_reason(m))]


def unhandled_weights_reason(module: nn.Module) -> str | None:
    """transformers 5 holds MoE experts as fused 3-D parameters (MixtralExperts, Qwen3MoeExperts) in a module
    that is no linear: without this they would stay bf16 unnamed. Convolutions are named the same way."""
    if isinstance(module, _TwinExperts):
        return None
    big = [(n, tuple(p.shape)) for n, p in module.named_parameters(recurse=False)
           if p.dim() >= 3 and p.dtype.is_floating_point]
    if not big:
        return None
    shapes = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in big)
    if isinstance(module, nn.modules.conv._ConvNd):
        what = "a convolution, not quantized by ds_quant"
    elif experts_unsupported_reason(module) is None:
        return None  # fused experts ds_quant patches (unless the config blocks them)
    else:
        what = experts_unsupported_reason(module)
    return f"holds {len(big[0][1])}-D weights ({shapes}): {what}; left in high precision"


def format_skipped(skipped: list[tuple[str, str, str]]) -> str:
    """One line counting what stays in high precision, per class: '3 layer(s): 2 Foo, 1 Bar'."""
    counts = Counter(cls for _, cls, _ in skipped)
    return f"{len(skipped)} layer(s): " + ", ".join(f"{n} {c}" for c, n in sorted(counts.items()))


def format_report(report: list[Swapped]) -> str:
    if not report:
        return "Patched modules: none"
    w = max(len(r.name) for r in report)
    lines = [f"Patched modules ({len(report)}):", f"  {'name':<{w}}  {'original type':<22} {'new type':<16} FP8 GEMM"]
    lines += [f"  {r.name:<{w}}  {r.old_type:<22} {r.new_type:<16} {r.gemm}".rstrip() for r in report]
    counts = Counter((r.old_type, r.new_type) for r in report)
    lines += ["  count: " + ", ".join(f"{n} {a} -> {b}" for (a, b), n in sorted(counts.items()))]
    return "\n".join(lines)


# -- helpers for the above -------------------------------------------------------------------------------
def model_tp(model: nn.Module) -> tuple[int, int, object]:
    """(tp rank, tp size, group) from the model's DeepSpeed TP layers, patched or not."""
    return tp_position(m.layout if isinstance(m, _TwinLinear) else TPLayout.of(m) for m in model.modules()
                       if isinstance(m, _TwinLinear) or spec_of(m) is not None)


def tp_position(items) -> tuple[int, int, object]:
    """(tp rank, tp size, group) of the first tensor-parallel layer; (0, 1, None) if there is none."""
    for item in items:
        layout = item.layout if isinstance(item, _TwinLinear) else item
        if layout.tp_size > 1:
            return layout.tp_rank, layout.tp_size, layout.mp_group
    return 0, 1, None
