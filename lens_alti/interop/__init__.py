"""Bridges to other attribution tools (optional dependencies, imported only on demand)."""
