"""Reproduced pruning papers: one module each; the module docstring is the method card."""
