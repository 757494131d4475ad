"""Numerics: scales, per-layer specs, weight rounding (RTN, GPTQ) and the low-bit GEMMs with their kernels."""
