"""Tests of the lens-alti command line and the corpus runner (lens_alti.cli)."""
