"""Make the repository root importable so tests can share the benchmark's data generators (bench/); shared
fixtures."""

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture
def caplog_ds(caplog):
    """caplog that sees the ds_quant logger (it does not propagate to the root logger)."""
    logger = logging.getLogger("ds_quant")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)
