"""Peak RSS per rank and load time of the four ways to get an FP8 model (issue 14), at TP=1 and TP=2:
bf16 load + AutoTP, in-memory QUANTIZE, FP8 folder load, quantize-on-load; plus `ds-quant convert` itself.

    python bench/checkpoint_bench.py [--model DIR] [--work DIR] [--tp 1,2]

Default model: a random Llama of ~1.1 GB in bf16 (hidden 2048, 8 layers, vocab 32000), built once. Measured
through the real launcher (`deepspeed --num_gpus N`), the script an ordinary from_pretrained + init_inference
(bench/ckpt_user.py); load time = from_pretrained start to init_inference end, slowest rank; peak RSS per
rank = ru_maxrss at the end (the first forward included); "load + first forward" adds the first forward's
time, where a lazily mapped load (HF's bf16 one) pays its reads. Prints a markdown table with each path's ratio to
the bf16 load, that ratio above the base RSS (the bf16 script's ru_maxrss per rank after importing torch +
transformers (its modeling code included) + deepspeed, before from_pretrained), and the issue's budgets for
quantize-on-load and convert."""

import argparse
import glob
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
USER = ROOT / "bench" / "ckpt_user.py"
SHM = "/dev/shm/deepspeed_allreduce_buffer_*"


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, env=None, timeout=900):
    before = set(glob.glob(SHM))
    try:
        p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})}, cwd=ROOT)
    finally:
        for f in set(glob.glob(SHM)) - before:  # DeepSpeed 0.19 leaks its CPU shm buffers
            os.unlink(f)
    if p.returncode:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{(p.stdout + p.stderr)[-3000:]}")
    return p.stdout + p.stderr


def launch(tp: int, model: Path, out: Path, config: Path | None, env=None) -> dict:
    wrap = [ROOT / "launch" / "run.py", "--quant-config", config] if config else []
    run([BIN / "deepspeed", "--num_gpus", tp, "--master_port", port(), *wrap, USER, model, out], env)
    return json.loads(out.read_text())


def build_model(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path("/tmp/dsq-bench-llama-1g"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/dsq-bench-ckpt"))
    ap.add_argument("--tp", default="1,2")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if not (a.model / "config.json").exists():
        build_model(a.model)
    base = {"method": "HOOKS", "observer": "maxabs", "scale_method": "maxabs_hw",
            "dump_stats_path": str(a.work / "meas" / "m")}
    mcfg, qcfg = a.work / "measure.json", a.work / "quant.json"
    mcfg.write_text(json.dumps({**base, "mode": "MEASURE"}))
    qcfg.write_text(json.dumps({**base, "mode": "QUANTIZE"}))
    if not (a.work / "meas" / "m.json").exists():
        launch(1, a.model, a.work / "measure.out", mcfg)
    fp8 = a.work / "fp8"
    if not fp8.exists():
        t0 = time.perf_counter()
        code = ("import resource, sys; from ds_quant.cli import main; rc = main(sys.argv[1:]); "
                "print('MAXRSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); sys.exit(rc)")
        out = run([sys.executable, "-c", code, "convert", a.model, fp8, "--quant-config", qcfg])
        rss = float(next(x for x in out.splitlines() if x.startswith("MAXRSS_MB")).split()[1])
        conv = (time.perf_counter() - t0, rss)
        (a.work / "convert.json").write_text(json.dumps(conv))
    conv_s, conv_rss = json.loads((a.work / "convert.json").read_text())
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors")) / 2**20  # noqa: E731
    rows = []
    for tp in (int(t) for t in a.tp.split(",")):
        for label, model, cfg, env in [("bf16 load + AutoTP", a.model, None, None),
                                       ("in-memory QUANTIZE", a.model, qcfg, None),
                                       ("FP8 folder load", fp8, qcfg, None),
                                       ("quantize-on-load", a.model, qcfg, {"DS_QUANT_QUANTIZE_ON_LOAD": "1"})]:
            r = launch(tp, model, a.work / f"{tp}_{label[:4]}.json", cfg, env)
            rows.append((tp, label, r))
            print(tp, label, r, flush=True)
    sizes = folder_sizes(fp8)
    print(f"\nmodel {a.model}: bf16 {size(a.model):.0f} MB, FP8 folder {size(fp8):.0f} MB; `ds-quant convert` "
          f"{conv_s:.0f} s, peak RSS {conv_rss:.0f} MB (goal: FP8 size + 3 largest bf16 tensors = "
          f"{size(fp8) + 3 * sizes['largest_bf16']:.0f} MB)\n")
    print("| TP | path | peak RSS per rank (MB) | ratio to bf16 | above base: ratio to bf16 | load time (s) | "
          "load + first forward (s) |")
    print("|---|---|---|---|---|---|---|")
    bf16 = {tp: r for tp, label, r in rows if label.startswith("bf16")}
    for tp, label, r in rows:
        ref = bf16.get(tp)
        ratio = above = "-"
        if ref is not None and label != "bf16 load + AutoTP":
            ratio = " / ".join(f"{x / y:.2f}" for x, y in zip(r["rss_mb"], ref["rss_mb"], strict=True))
            above = " / ".join(f"{(x - b) / (y - b):.2f}" for x, y, b in
                               zip(r["rss_mb"], ref["rss_mb"], ref["base_mb"], strict=True))
        print(f"| {tp} | {label} | {' / '.join(f'{x:.0f}' for x in r['rss_mb'])} | {ratio} | {above} | "
              f"{r['load_s']:.1f} | {r['load_s'] + r['first_forward_s']:.1f} |")
    base = [b for r in bf16.values() for b in r["base_mb"]]
    print(f"\nbase RSS (the bf16 script's ru_maxrss with torch + transformers + deepspeed imported, before "
          f"from_pretrained): {min(base):.0f}-{max(base):.0f} MB per rank")
    for tp, label, r in rows:
        print(f"TP={tp} {label}: peak RSS at the end of init_inference "
              f"{' / '.join(f'{x:.0f}' for x in r['load_rss_mb'])} MB (the rest: the first forward)")
    for tp, label, r in rows:
        if label == "quantize-on-load":
            budget = sizes["fp8_linears"] / tp + sizes["largest_bf16"] + sizes["non_linear"] + 300
            print(f"quantize-on-load TP={tp}: peak {max(r['rss_mb']):.0f} MB per rank; goal: FP8 shard "
                  f"{sizes['fp8_linears'] / tp:.0f} + one bf16 layer {sizes['largest_bf16']:.0f} + non-linear "
                  f"weights {sizes['non_linear']:.0f} + 300 = {budget:.0f} MB: "
                  f"{'met' if max(r['rss_mb']) <= budget else 'MISSED'}")


def folder_sizes(fp8: Path) -> dict:
    """MB of an FP8 folder's FP8 linears (weights + scales), of its other tensors, and of its largest linear
    in bf16 (two bytes per FP8 byte)."""
    from ds_quant.files.safetensors import DTYPES, SafetensorsFile

    lin = other = largest = 0
    for path in fp8.glob("*.safetensors"):
        with SafetensorsFile(path) as f:
            for k, info in f.tensors.items():
                n = info.end - info.begin
                if info.dtype == "F8_E4M3" or k.endswith((".weight_scale", ".input_scale")):
                    lin += n
                    largest = max(largest, 2 * n if DTYPES[info.dtype].itemsize == 1 else 0)
                else:
                    other += n
    return {"fp8_linears": lin / 2**20, "non_linear": other / 2**20, "largest_bf16": largest / 2**20}

if __name__ == "__main__":
    main()
