"""Wrap `deepspeed.init_inference` so an unmodified script comes back measured or quantized.

With `ds_quant.install()` active, every `init_inference` call reads the config from `--quant-config
FILE` or `QUANT_CONFIG`; without either, it behaves exactly as DeepSpeed's own.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .config import CLI_FLAG, ENV_VAR, QuantConfig, resolve_config
from .parallel import dist
from .prepare import prep_model
from .workflows import hf_model

if TYPE_CHECKING:
    from torch import nn

_WRAPPED_ATTR = "__ds_quant_wrapped__"


def install(config: QuantConfig | Mapping | str | os.PathLike | None = None,
            on_model: Callable[[nn.Module], None] | None = None) -> None:
    """Wrap `deepspeed.init_inference` (idempotent; imports DeepSpeed here, not at `import ds_quant`).

    Without `config`, each call reads `--quant-config` / `QUANT_CONFIG`. With it, every call uses that
    config and never reads argv: the `ds_quant.run` wrapper pins its own `--quant-config` this way, so
    the wrapped script's arguments cannot be mistaken for ours. `on_model` is called with every prepared
    model (the wrapper keeps them, to finish their measurements when the script returns).
    """
    import deepspeed

    pinned = None if config is None else resolve_config(config)
    hf_model.install_from_pretrained(lambda: pinned if pinned is not None else QuantConfig.from_env_or_args())
    if getattr(deepspeed.init_inference, _WRAPPED_ATTR, False):
        if pinned is None and on_model is None:
            return
        uninstall()
    deepspeed.init_inference = _wrap(deepspeed.init_inference, pinned, on_model)


def uninstall() -> None:
    import deepspeed

    original = getattr(deepspeed.init_inference, "__wrapped__", None)
    if getattr(deepspeed.init_inference, _WRAPPED_ATTR, False) and original is not None:
        deepspeed.init_inference = original


def _wrap(init_inference, pinned: QuantConfig | None = None, on_model=None):
    @functools.wraps(init_inference)
    def init_inference_quantized(*args, **kwargs):
        hf_model.refuse_compressed(args[0] if args else kwargs.get("model"))  # before AutoTP cuts it
        engine = init_inference(*args, **kwargs)
        dist.guard_shm_allreduce()
        config = pinned if pinned is not None else QuantConfig.from_env_or_args()
        if config is None and hf_model.pending(engine.module) is not None:
            config = QuantConfig(source="the FP8 checkpoint")  # its scales are in the folder
        if config is not None:
            # prep_model swaps submodules in place; the engine keeps the same module object.
            engine.module = prep_model(engine.module, config)
            if on_model is not None:
                on_model(engine.module)
        return engine

    setattr(init_inference_quantized, _WRAPPED_ATTR, True)
    return init_inference_quantized


def add_quant_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `--quant-config FILE` to a script's parser (HQT's flag; `QUANT_CONFIG` is the env fallback)."""
    parser.add_argument(CLI_FLAG, dest="quant_config", metavar="FILE", default=None,
                        help=f"ds_quant JSON config (HQT schema); falls back to ${ENV_VAR}")
    return parser
