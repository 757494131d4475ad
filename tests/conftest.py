"""Shared fixtures. The repository root is on sys.path through setup.cfg's `pythonpath = .`, so tests import
`tests.*` (the launcher, the tiny model builder) and `bench.*` from it."""

import logging

import pytest

from tests.scripts.make_tiny_hf_model import build as build_tiny_llama


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
    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny_hf")))
