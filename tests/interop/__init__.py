"""Tests of integrations with other tools (lens_alti.interop: inseq)."""
