"""Layers: the measured and quantized twins of DeepSpeed's TP linears, fused experts, the KV cache and attention, and the swap that puts them in a model."""
