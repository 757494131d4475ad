"""Measure on N ranks, merge, then quantize on M ranks: one script, one calibration set, two configs.

    launch/measure_then_quantize.sh --measure-config measure.json --quantize-config quant.json \\
        --measure-ranks 2 --quantize-ranks 1 your_script.py [its args...]

Both runs go through launch/run.py, so the script is not modified. The MEASURE run writes one shard per
rank and, on rank 0, the merged model-level file `<dump_stats_path>.json`; the QUANTIZE run, at any TP
size, computes its scales from that file. The two configs must name the same `dump_stats_path`.
`commands` (arguments -> the two command lines) is pure; `main` checks the configs and runs them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

RUN_PY = str(Path(__file__).resolve().with_name("run.py"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--measure-config", required=True, metavar="FILE", help="config with mode MEASURE")
    p.add_argument("--quantize-config", required=True, metavar="FILE", help="config with mode QUANTIZE")
    p.add_argument("--measure-ranks", type=int, default=1, metavar="N")
    p.add_argument("--quantize-ranks", type=int, default=1, metavar="M")
    p.add_argument("--launcher", choices=["deepspeed", "mpirun"], default="deepspeed")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--hostfile", default=None, help="DeepSpeed hostfile for the MEASURE run (multi-node)")
    p.add_argument("script")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    return p.parse_args(argv)


def commands(args: argparse.Namespace, python: str, bin_dir: str) -> list[tuple[list[str], dict[str, str]]]:
    """The MEASURE and the QUANTIZE command lines, each with the variables to add to the environment."""
    out = []
    for config, ranks, hostfile in ((args.measure_config, args.measure_ranks, args.hostfile),
                                    (args.quantize_config, args.quantize_ranks, None)):
        ours = [RUN_PY, "--quant-config", config, args.script, *args.script_args]
        if args.launcher == "deepspeed":
            launcher = [os.path.join(bin_dir, "deepspeed"), *(["--hostfile", hostfile] if hostfile else []),
                        "--num_gpus", str(ranks), "--master_port", str(args.master_port)]
            out.append(([*launcher, *ours], {}))
        else:
            launcher = [os.path.join(bin_dir, "mpirun"), "-np", str(ranks), "-x", "MASTER_PORT",
                        *(["--hostfile", hostfile] if hostfile else []), python]
            out.append(([*launcher, *ours], {"MASTER_PORT": str(args.master_port)}))
    return out


def check_configs(measure, quantize) -> str | None:
    """Why the two configs cannot form a pipeline, or None."""
    if measure.mode.value != "MEASURE":
        return f"{measure.source}: mode is {measure.mode.value}, the first run needs MEASURE"
    if quantize.mode.value != "QUANTIZE":
        return f"{quantize.source}: mode is {quantize.mode.value}, the second run needs QUANTIZE"
    if measure.dump_stats_path != quantize.dump_stats_path:
        return (f"dump_stats_path differs: {measure.dump_stats_path!r} ({measure.source}) vs "
                f"{quantize.dump_stats_path!r} ({quantize.source}); QUANTIZE reads what MEASURE wrote")
    return None


def main(argv: list[str] | None = None) -> int:
    from ds_quant import ConfigError, QuantConfig
    from ds_quant.files.shards import merged_path

    args = parse_args(argv)
    try:
        measure, quantize = QuantConfig.from_json(args.measure_config), QuantConfig.from_json(args.quantize_config)
    except ConfigError as e:
        print(f"measure_then_quantize: {e}", file=sys.stderr)
        return 2
    problem = check_configs(measure, quantize)
    if problem:
        print(f"measure_then_quantize: {problem}", file=sys.stderr)
        return 2
    steps = commands(args, sys.executable, os.path.dirname(sys.executable))
    for (argv_, env), what in zip(steps, ("MEASURE", "QUANTIZE"), strict=True):
        print(f"measure_then_quantize: {what}: {' '.join(argv_)}", flush=True)
        rc = subprocess.call(argv_, env={**os.environ, **env})
        if rc != 0:
            print(f"measure_then_quantize: {what} failed with exit code {rc}", file=sys.stderr)
            return rc
        if what == "MEASURE":
            print(f"measure_then_quantize: merged measurements: {merged_path(measure.dump_stats_path)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
