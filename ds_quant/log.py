"""The `ds_quant` logger: every line says which rank speaks."""

from __future__ import annotations

import logging
import os


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = current_rank()
        return True


def current_rank() -> int:
    """Global rank for log prefixes only (layouts read ranks from their process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def get_logger() -> logging.Logger:
    logger = logging.getLogger("ds_quant")
    if not any(getattr(h, "_ds_quant", False) for h in logger.handlers):  # configure once, ours only
        handler = logging.StreamHandler()
        handler._ds_quant = True
        handler.addFilter(_RankFilter())
        handler.setFormatter(logging.Formatter("[ds_quant rank %(rank)s] %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("DS_QUANT_LOG_LEVEL", "INFO").upper())
        logger.propagate = False
    return logger


def verbose() -> bool:
    return os.environ.get("QUANT_VERBOSE", "0") not in ("", "0", "false", "False")


def rank0_progress(items, desc: str, unit: str = "it", min_items: int = 2):
    """`items` with a tqdm bar on global rank 0 (when there are at least `min_items`); plain elsewhere."""
    items = list(items)
    if len(items) < min_items or current_rank() != 0:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, leave=False)
