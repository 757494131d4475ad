"""Run an unmodified DeepSpeed inference script with ds_quant active.

    deepspeed --num_gpus 2 launch/run.py --quant-config CFG your_script.py [its args...]
    mpirun -np 2 python -m ds_quant.run --quant-config CFG your_script.py [its args...]

Our options come before the script path; everything after it belongs to the script, which runs as
`__main__` with exactly the `sys.argv` it would have had without us (plus the `--local_rank=N` that
DeepSpeed's launcher hands to whatever it launches). The config is loaded once, here, and pinned: a
`--quant-config` among the script's own arguments is the script's business, never read as ours.
Measurements are finished when the script returns, or exits with `sys.exit(0)`; then every rank waits for
the others and the process group is destroyed before the interpreter exits (`dist.shutdown`).

`plan` (argv, env -> what to run) and `mpi_env` (MPI ranks -> torch.distributed variables) are pure
functions; `main` is the thin layer that applies them.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .config import CLI_FLAG, ENV_VAR, QuantConfig
from .errors import DsQuantError, RankError
from .hook import install
from .layers.experts import Fp8Experts, MeasuredExperts
from .layers.linear import Fp8Linear, MeasuredLinear
from .layers.patch import format_skipped, skipped_tp_layers
from .layers.state import state_of
from .log import current_rank, get_logger
from .parallel import dist
from .workflows.measure import finish_measurements

USAGE = (f"usage: [deepspeed --num_gpus N | mpirun -np N python] launch/run.py [{CLI_FLAG} FILE] "
         "your_script.py [its args...]\n"
         f"  {CLI_FLAG} FILE  ds_quant config (HQT JSON); default: ${ENV_VAR}\n"
         "  everything after the script path is passed to the script unchanged")
_LOCAL_RANK_FLAGS = ("--local_rank", "--local-rank")
# Open MPI / PMIx / MPICH-Hydra variables that say "this process was started by mpirun".
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMI_SIZE")
DEFAULT_MASTER_PORT = "29500"


class UsageError(DsQuantError, ValueError):
    """Bad wrapper arguments; the message says what to fix."""


@dataclass(frozen=True)
class Plan:
    script: str            # path of the user's script, absolute
    argv: tuple[str, ...]  # the script's sys.argv: (script as given, *its args)
    env: dict[str, str]    # variables to set before the script runs
    config_path: str       # absolute path of the config file


def plan(argv: Sequence[str], env: Mapping[str, str], cwd: str) -> Plan:
    """Split `[our options] script [its args]` and say what the script will see. Pure: no I/O.

    `argv` excludes the wrapper's own name. `--local_rank=N` (added by DeepSpeed's launcher in front of
    our options) is forwarded to the script, in the same spelling, right after its name, as DeepSpeed
    would have passed it had it launched the script directly.
    """
    config, local_rank, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-"):
            break
        if arg in ("-h", "--help"):
            raise UsageError(USAGE)
        name, has_value, value = arg.partition("=")
        if name not in (CLI_FLAG, *_LOCAL_RANK_FLAGS):
            raise UsageError(f"unknown option {arg!r} before the script path; options for your script go after "
                             f"it\n{USAGE}")
        if not has_value:
            if i + 1 >= len(argv):
                raise UsageError(f"{name} needs a value\n{USAGE}")
            i, value = i + 1, argv[i + 1]
        if name == CLI_FLAG:
            config = value
        else:
            local_rank = [arg if has_value else f"{name}={value}"]
        i += 1
    if i >= len(argv):
        raise UsageError(f"no script to run\n{USAGE}")
    script, script_args = argv[i], list(argv[i + 1:])
    config = config or env.get(ENV_VAR) or None
    if config is None:
        raise UsageError(f"no config: pass {CLI_FLAG} FILE before the script path, or set {ENV_VAR}\n{USAGE}")
    config_path = os.path.normpath(os.path.join(cwd, config))
    return Plan(script=os.path.normpath(os.path.join(cwd, script)), argv=(script, *local_rank, *script_args),
                env={ENV_VAR: config_path}, config_path=config_path)


def in_mpi_job(env: Mapping[str, str]) -> bool:
    return any(v in env for v in _MPI_SIZE_VARS)


def needs_mpi_discovery(env: Mapping[str, str]) -> bool:
    """Started by mpirun and not by a launcher that already set torch.distributed's variables."""
    return in_mpi_job(env) and not all(v in env for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def mpi_env(rank: int, world_size: int, local_rank: int, master_addr: str, env: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed's env:// variables for an mpirun-started process. Pure.

    Like `deepspeed.comm.mpi_discovery`, except that a MASTER_PORT already in the environment is kept
    (DeepSpeed's overwrites it with 29500, so two jobs on one machine would collide). With these set
    before the script starts, a script that reads WORLD_SIZE, calls `deepspeed.init_distributed()` or
    `torch.distributed.init_process_group()` itself, or leaves it to `init_inference`, works unchanged.
    """
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank),
            "LOCAL_SIZE": env.get("OMPI_COMM_WORLD_LOCAL_SIZE", env.get("LOCAL_SIZE", str(world_size))),
            "MASTER_ADDR": master_addr, "MASTER_PORT": env.get("MASTER_PORT", DEFAULT_MASTER_PORT)}


# -- the thin layer ------------------------------------------------------------------------------------
def discover_mpi(env: Mapping[str, str]) -> dict[str, str]:
    """Ranks from mpi4py; the master address is rank 0's first address (or MASTER_ADDR if set)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    hosts = comm.allgather(MPI.Get_processor_name())
    local_rank = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", sum(h == hosts[rank] for h in hosts[:rank])))
    master_addr = comm.bcast((env.get("MASTER_ADDR") or _first_address()) if rank == 0 else None, root=0)
    return mpi_env(rank, size, local_rank, master_addr, env)


def _first_address() -> str:
    import socket
    import subprocess

    try:
        return subprocess.check_output(["hostname", "-I"], text=True).split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return socket.gethostbyname(socket.gethostname())


def _finish(models: list, config: QuantConfig, script: str) -> None:
    """Finish what the script left unfinished (collective: every rank gets here), then one summary."""
    import torch


    log, merged = get_logger(), []
    for model in models:
        if any(isinstance(m, (MeasuredLinear, MeasuredExperts)) for m in model.modules()) and \
                not getattr(state_of(model), "finished", False):
            if not dist.initialized():
                log.warning("the script destroyed the process group before its measurements were saved; call "
                            "ds_quant.finish_measurements(model) before destroying it")
                continue
            with torch.no_grad():
                merged.append(finish_measurements(model))
    if current_rank() == 0:
        counts = {t.__name__: sum(isinstance(m, t) for model in models for m in model.modules())
                  for t in (MeasuredLinear, Fp8Linear, MeasuredExperts, Fp8Experts)}
        done = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no layers patched"
        skipped = [s for model in models for s in skipped_tp_layers(model)]
        if skipped:  # never silent: the per-layer reasons are in the log above
            done += f"; left in high precision: {format_skipped(skipped)}"
        log.info(f"summary: {os.path.basename(script)} finished; {config.mode.value} ({config.source}): "
                 f"{len(models)} init_inference call(s), {done}"
                 + (f"; merged measurements in {', '.join(m for m in merged if m)}" if any(merged) else ""))


def main(argv: Sequence[str] | None = None) -> int:
    models: list = []
    started = False  # the script is running: errors are reported per rank, by the logger
    try:
        p = plan(sys.argv[1:] if argv is None else argv, os.environ, os.getcwd())
        config = QuantConfig.from_json(p.config_path)  # a bad config fails here, in one line, before any work
        if not os.path.isfile(p.script):
            raise UsageError(f"script not found: {p.script}")
        os.environ.update(p.env)
        if needs_mpi_discovery(os.environ):
            os.environ.update(discover_mpi(os.environ))
        install(config, on_model=models.append)
        sys.argv = list(p.argv)
        sys.path[0] = os.path.dirname(p.script)  # as `python your_script.py` would have it
        started = True
        try:
            runpy.run_path(p.script, run_name="__main__")
        except SystemExit as e:
            if e.code not in (None, 0):
                raise
        _finish(models, config, p.script)
    except DsQuantError as e:
        # Ours, and self-explanatory: one line, no traceback; anything else keeps its traceback.
        if isinstance(e, UsageError) and str(e) == USAGE:  # -h / --help
            print(USAGE)
            return 0
        if not started:  # nothing ran yet: the wrapper's own line
            print(f"ds_quant: {e}", file=sys.stderr)
            return 2
        # One line per rank, naming it. A RankError was agreed on by every rank (all stand at the same point), so
        # the job can still end in order, with every rank's line printed.
        get_logger().error(str(e))
        if isinstance(e, RankError):
            dist.shutdown()
        return 2
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
