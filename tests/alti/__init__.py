"""Tests of lens_alti.alti: the model-agnostic mathematics (kernels, masking, memory, invariants)."""
