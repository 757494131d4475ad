"""Per-layer error report: how much each FP8 layer and the whole model lose, on calibration data.

    calibration batches ─► high-precision model, a hook per target linear
                              └─ same input ─► FP8 twin ─► Σ y_hp², Σ (y_hp − y_fp8)²  (per layer)
                           ─► auto-blocklist (SQNR < auto_blocklist_sqnr_db stays bf16) ─► prep_model
                           ─► same batches ─► end-to-end output SQNR

A layer's SQNR is measured with its high-precision input, so it is the layer's own error, not the
error accumulated upstream. Under tensor parallelism the sums are added over the TP group: a column
layer's rank holds part of the output, a row layer's output is whole on every rank (adding the same
sums on both ranks leaves the ratio unchanged). Every rank must run the same batches.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from .config import Mode, ModuleFilter, QuantConfig, resolve_config
from .layers.patch import find, make_filter, tp_position
from .log import current_rank, get_logger, rank0_progress
from .parallel.tp import TPLayout
from .prepare import prep_model
from .workflows.measure import finish_measurements
from .workflows.quantize import fp8_maker


@dataclass(frozen=True)
class LayerError:
    name: str
    kind: str
    out_features: int
    in_features: int
    sqnr_db: float
    blocked: bool = False  # left in high precision by auto_blocklist_sqnr_db


@dataclass(frozen=True)
class Report:
    layers: list[LayerError]  # worst first
    output_sqnr_db: float | None = None  # end-to-end (logits for a causal LM), after the auto-blocklist
    threshold_db: float | None = None
    batches: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def blocked(self) -> list[str]:
        return [e.name for e in self.layers if e.blocked]

    def to_dict(self) -> dict:
        return {"threshold_db": self.threshold_db, "output_sqnr_db": self.output_sqnr_db, "batches": self.batches,
                "blocked": self.blocked, "layers": [asdict(e) for e in self.layers], **self.extra}

    def format(self) -> str:
        w = max([len(e.name) for e in self.layers] + [5])
        lines = [f"  {'layer':<{w}}  {'kind':<7} {'out x in':>13}  {'SQNR dB':>8}  precision"]
        for e in self.layers:
            lines.append(f"  {e.name:<{w}}  {e.kind:<7} {f'{e.out_features}x{e.in_features}':>13}  "
                         f"{e.sqnr_db:8.2f}  {'bf16 (auto-blocklist)' if e.blocked else 'fp8'}")
        head = f"Per-layer output SQNR, FP8 vs high precision, over {self.batches} calibration batch(es), worst first:"
        tail = [f"End-to-end output SQNR: {self.output_sqnr_db:.2f} dB" if self.output_sqnr_db is not None else ""]
        if self.threshold_db is not None:
            tail.append(f"auto_blocklist_sqnr_db={self.threshold_db:g}: {len(self.blocked)} layer(s) kept in high "
                        f"precision{': ' + ', '.join(self.blocked) if self.blocked else ''}")
        return "\n".join([head, *lines, *[t for t in tail if t]])


Forward = Callable[[nn.Module, object], object]


def quantize_with_report(model: nn.Module, config: QuantConfig | dict | str | None, batches: Sequence,
                         forward: Forward | None = None) -> tuple[nn.Module, Report]:
    """QUANTIZE `model` like `prep_model`, after measuring every layer's FP8 error on `batches`; layers
    below `auto_blocklist_sqnr_db` stay in high precision. Collective under TP: every rank calls it."""
    cfg = resolve_config(config)
    if cfg is None or cfg.mode is not Mode.QUANTIZE:
        raise ValueError("quantize_with_report needs a QUANTIZE config (it compares FP8 against the model as it is)")
    forward = forward or _call
    sqnr, shapes, reference = layer_sqnr(model, cfg, batches, forward)
    threshold = cfg.auto_blocklist_sqnr_db
    blocked = sorted(n for n, s in sqnr.items() if threshold is not None and s < threshold)
    # the auto-blocklist is applied: the blocks are now explicit names
    model = prep_model(model, replace(with_blocked(cfg, blocked), auto_blocklist_sqnr_db=None))
    with torch.no_grad():
        quantized = [main_output(forward(model, b)) for b in rank0_progress(batches, "ds_quant report: FP8 pass")]
    layers = sorted((LayerError(n, kind, o, i, s, n in blocked) for n, s in sqnr.items()
                     for kind, o, i in [shapes[n]]), key=lambda e: (e.sqnr_db, e.name))
    report = Report(layers, sqnr_of(reference, quantized), threshold, len(batches))
    if blocked:
        get_logger().info(f"auto_blocklist_sqnr_db={threshold:g}: kept {len(blocked)} layer(s) in high precision: "
                          f"{', '.join(blocked)}")
    return model, report


def layer_sqnr(model: nn.Module, config: QuantConfig, batches: Iterable, forward: Forward | None = None
               ) -> tuple[dict[str, float], dict[str, tuple[str, int, int]], list[torch.Tensor]]:
    """Each target linear's output SQNR (dB) against its FP8 twin fed the same input; also the layers'
    (kind, full out, full in) and the model's high-precision outputs per batch. The model is unchanged."""
    forward = forward or _call
    targets = find(model, make_filter(functools.partial(config.selects, "linear")))
    if not targets:
        raise ValueError("no layer to report on: the config's allow/block lists leave no supported linear")
    make = fp8_maker(config, targets)
    twins = {fqn: make(m, fqn) for fqn, m in rank0_progress(targets, "ds_quant report: FP8 twins")}
    sums = torch.zeros(len(targets), 2, dtype=torch.float64)  # per layer: (signal, noise)
    index = {fqn: i for i, (fqn, _) in enumerate(targets)}

    def hook(fqn: str):
        def observe(module, args, y_hp):
            y_fp8 = twins[fqn](args[0])
            sums[index[fqn], 0] += y_hp.double().pow(2).sum().cpu()
            sums[index[fqn], 1] += (y_hp.double() - y_fp8.double()).pow(2).sum().cpu()
        return observe

    handles = [m.register_forward_hook(hook(fqn)) for fqn, m in targets]
    try:
        with torch.no_grad():
            reference = [main_output(forward(model, b))
                         for b in rank0_progress(batches, "ds_quant report: calibration")]
    finally:
        for h in handles:
            h.remove()
    _, world, group = tp_position(TPLayout.of(m) for _, m in targets)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(sums, group=group)
    shapes = {}
    for fqn, m in targets:
        layout = TPLayout.of(m)
        shapes[fqn] = (layout.kind.value, *layout.full_shape(*m.weight.shape))
    return {fqn: _db(*sums[index[fqn]].tolist()) for fqn, _ in targets}, shapes, reference


def with_blocked(config: QuantConfig, names: Sequence[str]) -> QuantConfig:
    """The config with `names` added to the blocklist as exact-name patterns."""
    if not names:
        return config
    extra = tuple(f"^{re.escape(n)}$" for n in names)
    return replace(config, blocklist=ModuleFilter(config.blocklist.types, config.blocklist.names + extra))


def sqnr_of(reference: Sequence[torch.Tensor], approx: Sequence[torch.Tensor]) -> float:
    """SQNR (dB) over all batches together."""
    signal = sum(float(r.double().pow(2).sum()) for r in reference)
    noise = sum(float((r.double() - a.double()).pow(2).sum()) for r, a in zip(reference, approx, strict=True))
    return _db(signal, noise)


def main_output(out) -> torch.Tensor:
    """The tensor to compare from a model's output: logits, else last hidden state, else the first tensor."""
    if isinstance(out, torch.Tensor):
        return out.detach().float()
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value.detach().float()
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0].detach().float()
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}; pass forward= returning a tensor")


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


def _call(model: nn.Module, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


# -- `ds-quant report` ------------------------------------------------------------------------------------------
DEFAULT_TEXTS = ("The quick brown fox jumps over the lazy dog.",
                 "def add(a, b):\n    return a + b",
                 "Tensor parallelism splits every linear layer across the ranks of a group.")


def command(model_path: str, config_path: str, text_path: str | None = None, max_length: int = 256,
            json_out: str | None = None) -> int:
    """Load an HF model, run the texts through it: MEASURE writes the measurements (and workbook);
    QUANTIZE prints the per-layer report. Under `deepspeed --num_gpus N` the model is tensor-parallel."""
    import json
    import os
    from pathlib import Path


    cfg = QuantConfig.from_json(config_path)
    texts = DEFAULT_TEXTS if text_path is None else [t for t in Path(text_path).read_text().split("\n\n") if t.strip()]
    model, encode = load_hf(model_path)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import deepspeed

        model = deepspeed.init_inference(model, tensor_parallel={"tp_size": world}, dtype=torch.bfloat16,
                                         replace_with_kernel_inject=False).module
    batches = [encode(t)[:, :max_length] for t in texts]
    if cfg.mode is Mode.MEASURE:
        model = prep_model(model, cfg)
        with torch.no_grad():
            for b in rank0_progress(batches, "ds_quant report: calibration"):
                model(b)
        out = finish_measurements(model)
        if out:
            print(f"measured {len(batches)} text(s): {out}")
    else:
        _, report = quantize_with_report(model, cfg, batches)
        if current_rank() == 0:
            print(report.format())
            if json_out:
                Path(json_out).parent.mkdir(parents=True, exist_ok=True)
                Path(json_out).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # a rank that exits early takes the launcher down with rank 0 still writing files
    return 0


def load_hf(path: str):
    """(bf16 model, text -> (1, T) ids). A directory without tokenizer files is read as bytes (ids 0-255,
    bos from the model config), like the tiny Llama in examples/."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(path, dtype=torch.bfloat16).eval()
    if any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        return model, lambda text: tok(text, return_tensors="pt")["input_ids"]
    bos = config.bos_token_id
    return model, lambda text: torch.tensor([[bos, *text.encode()]] if bos is not None else [list(text.encode())])
