"""Tests of lens_alti.analysis: interventions, alignments, rank comparisons, studies."""
