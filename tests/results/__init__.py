"""Tests of lens_alti.results: result objects, save and load."""
