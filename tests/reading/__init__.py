"""Tests of lens_alti.reading: readers per architecture and block-layout feature, against float64 references."""
