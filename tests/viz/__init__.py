"""Tests of lens_alti.viz: figures and the HTML report in a real browser."""
