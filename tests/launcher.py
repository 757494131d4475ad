"""Running real launchers from tests: a free port, and a command that must succeed (its output returned)."""

import glob
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEEPSPEED = str(BIN / "deepspeed")
SHM_BUFFERS = "/dev/shm/deepspeed_allreduce_buffer_*"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ok(cmd: list[str], cwd: Path, timeout: int = 600, keep_shm: bool = False, **env: str) -> str:
    """Run `cmd` with the test's environment plus `env` (QUANT_CONFIG only if given); fail with its output.
    The job's leftover shm buffers are removed afterwards, unless `keep_shm` (a test that checks them)."""
    full_env = {k: v for k, v in os.environ.items() if k != "QUANT_CONFIG"}
    full_env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", **env})
    before = set(glob.glob(SHM_BUFFERS))
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=full_env, capture_output=True, text=True,
                              timeout=timeout)
    finally:
        # DeepSpeed 0.19's CPU shm allreduce never unlinks its two 69 MB buffers per job (RAM in /dev/shm);
        # ds_quant's wrapper does at its orderly end, plain DeepSpeed scripts do not.
        for path in [] if keep_shm else leftover_shm(before, job_ports(cmd, full_env)):
            os.unlink(path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{output[-6000:]}"
    return output


def job_ports(cmd: list, env: dict) -> set[str]:
    """The master port(s) a launch command uses (`--master_port N`, `--master-port N`, or MASTER_PORT)."""
    args = [str(c) for c in cmd]
    ports = {b for a, b in zip(args, args[1:], strict=False) if a in ("--master_port", "--master-port")}
    ports |= {a.split("=", 1)[1] for a in args if a.startswith(("--master_port=", "--master-port="))}
    return ports or ({env["MASTER_PORT"]} if env.get("MASTER_PORT") else set())


def leftover_shm(before: set[str], ports: set[str]) -> list[str]:
    """Shm buffers (`..._<uid>_<addr>_<port>_<rank>`) that appeared since `before` and belong to a job on
    one of `ports`: never another job's, which may still be waiting to open them (DeepSpeed spins until
    every rank's buffer exists, so unlinking one a job has not opened yet hangs that job)."""
    new = set(glob.glob(SHM_BUFFERS)) - before
    return sorted(p for p in new if not ports or p.rsplit("_", 2)[-2] in ports)


def deepspeed(ranks: int, script, *args: str, cwd: Path, timeout: int = 600, **env: str) -> str:
    """`deepspeed --num_gpus RANKS --master_port FREE script args...`, which must succeed."""
    return run_ok([DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *args],
                  cwd=cwd, timeout=timeout, **env)
