"""Parallel: DeepSpeed's TP layer kinds and layouts, and the collectives ranks agree through."""
