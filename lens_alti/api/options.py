"""The options of an ALTI computation, checked once and passed on as one typed object."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lens_alti.alti.contributions import BACKENDS, DEFAULT_CHUNK_BYTES, MEASURES
from lens_alti.errors import InvalidArgumentError
from lens_alti.validation import check_choice, check_size, check_type

DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class AltiOptions:
    """How every block is measured.

    Attributes:
        measure: "l1" (ALTI), "l2", "koba" or "attention" (docs/spec.md §2).
        heads: also compute per-head (token-through-head) contributions (docs/spec.md §3).
        dtype: the computation dtype, torch.float32 or torch.float64.
        check: verify each block's reconstruction (docs/spec.md §1) and raise when it fails.
        max_chunk_bytes: memory budget of one chunk of receivers' intermediates.
        backend: "native", "compiled", "eager" or "auto" (resolved once per call: `resolved`).
    """

    measure: str = "l1"
    heads: bool = False
    dtype: torch.dtype = torch.float32
    check: bool = True
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    backend: str = "auto"

    @classmethod
    def checked(
        cls,
        *,
        measure: str = "l1",
        heads: bool = False,
        dtype: torch.dtype = torch.float32,
        check: bool = True,
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        backend: str = "auto",
    ) -> AltiOptions:
        """The options, each argument checked (InvalidArgumentError / ArgumentTypeError naming it)."""
        if measure not in MEASURES:
            expected = f"one of {', '.join(MEASURES)} (unknown measure {measure!r})"
            raise InvalidArgumentError("measure", measure, expected)
        check_choice("backend", backend, BACKENDS)
        check_choice("dtype", dtype, DTYPES)
        for flag, value in (("heads", heads), ("check", check)):
            check_type(flag, value, bool, "True or False")
        chunk = check_size("max_chunk_bytes", max_chunk_bytes, minimum=1)
        return cls(measure, heads, dtype, check, chunk, backend)

    def resolved(self, backend: str) -> AltiOptions:
        """These options with the concrete backend chosen for the call."""
        return replace(self, backend=backend)
