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


def run_ok(cmd: list[str], cwd: Path, timeout: int = 600, **env: str) -> str:
    """Run `cmd` with the test's environment plus `env` (QUANT_CONFIG only if given); fail with its output."""
    full_env = {k: v for k, v in os.environ.items() if k != "QUANT_CONFIG"}
    full_env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", **env})
    before = set(glob.glob(SHM_BUFFERS))
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=full_env, capture_output=True, text=True,
                              timeout=timeout)
    finally:
        # DeepSpeed 0.19's CPU shm allreduce never unlinks its two 69 MB buffers per job (RAM in /dev/shm):
        # without this, one suite run leaves ~3.4 GB behind.
        for path in set(glob.glob(SHM_BUFFERS)) - before:
            os.unlink(path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{output[-6000:]}"
    return output


def deepspeed(ranks: int, script, *args: str, cwd: Path, timeout: int = 600, **env: str) -> str:
    """`deepspeed --num_gpus RANKS --master_port FREE script args...`, which must succeed."""
    return run_ok([DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *args],
                  cwd=cwd, timeout=timeout, **env)
