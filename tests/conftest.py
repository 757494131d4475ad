"""Make the repository root importable so tests can share the benchmark's data generators (bench/); shared
fixtures."""

import importlib.util
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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny seeded Llama as an HF folder (tests/scripts/make_tiny_hf_model.py), built once per session."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("make_tiny_hf_model", root / "tests" / "scripts" / "make_tiny_hf_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.build(tmp_path_factory.mktemp("tiny_hf")))
