"""Tests of the package as shipped: docs, notebooks, metadata, the wheel, import behaviour."""
