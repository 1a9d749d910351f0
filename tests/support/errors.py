"""Assertions about lens_alti's errors."""

from __future__ import annotations

import pytest

from lens_alti import errors


def raises_exactly(cls: type, argument: str, fn, *args, **kwargs) -> BaseException:
    """Call fn; it must raise exactly `cls` (a LensAltiError) whose message names `argument`."""
    with pytest.raises(errors.LensAltiError) as info:
        fn(*args, **kwargs)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    assert argument in str(info.value), str(info.value)
    return info.value
