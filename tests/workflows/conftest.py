"""The FP8 folders of tests/workflows/fp8_folders.py, built once for every checkpoint test in this package."""

import pytest

from tests.workflows import fp8_folders


@pytest.fixture(scope="package")
def work(tmp_path_factory):
    """Four models (two MoE), measured once, and FP8 folders for six configs."""
    return fp8_folders.folders(tmp_path_factory.mktemp("ckpt"))
