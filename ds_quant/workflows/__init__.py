"""Workflows: where the config meets the layers and the files (MEASURE, QUANTIZE, loading a folder, convert, the HF-model adapter, smoothing)."""
