"""Fused distance kernels: the only place where `H·n²·d` work happens (docs/spec.md §6).

Each kernel takes one batch item's chunk of receivers and block of sources:
`y[c, d]` resultants, `s[c, d]` per-receiver scales, `a[h, c, k]` attention weights and
`vo[h, k, d]` per-head value vectors after W_O, and reduces over `d` without ever
holding `[h, c, k, d]`. The loop over heads is unrolled in Python so that
`torch.compile` fuses it into one pass. The eager fallbacks (`EAGER`) compute the same
numbers (up to float rounding) with batched matmuls and `[h, c, k, d]` temporaries.
On CPU, `get_kernel(name, "native")` returns the C kernels of `lens_alti.alti.native`
(no JIT), falling back to these where they cannot be built.

Compiled kernels are compiled once per kernel and dtype with dynamic shapes; their
artefacts go to a persistent cache under lens_alti's cache folder (`$LENS_ALTI_CACHE`,
else `$XDG_CACHE_HOME/lens_alti`, `torchinductor/`) unless TORCHINDUCTOR_CACHE_DIR is set,
so a new process reuses them instead of recompiling (see `lens_alti.alti.backend`).

The diagonal residual term of self-attention is not included here: callers correct
those `c` entries afterwards.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor


def l1_heads_and_tokens(
    y: Float[Tensor, "c d"], s: Float[Tensor, "c d"], a: Float[Tensor, "h c k"], vo: Float[Tensor, "h k d"]
) -> tuple[Float[Tensor, "h c k"], Float[Tensor, "c k"]]:
    """(‖y_i − s_i⊙a_hij·vo_hj‖₁ per head, ‖y_i − s_i⊙Σ_h a_hij·vo_hj‖₁)."""
    y_, s_ = y[:, None, :], s[:, None, :]
    part = s_ * (a[0, :, :, None] * vo[0, None])
    total = part
    per_head = [(y_ - part).abs().sum(-1)]
    for h in range(1, a.shape[0]):
        part = s_ * (a[h, :, :, None] * vo[h, None])
        per_head.append((y_ - part).abs().sum(-1))
        total = total + part
    return torch.stack(per_head), (y_ - total).abs().sum(-1)


def _transformed(s: Tensor, a: Tensor, vo: Tensor) -> Tensor:
    s_ = s[:, None, :]
    total = s_ * (a[0, :, :, None] * vo[0, None])
    for h in range(1, a.shape[0]):
        total = total + s_ * (a[h, :, :, None] * vo[h, None])
    return total


def l1_tokens(y: Tensor, s: Tensor, a: Tensor, vo: Tensor) -> Float[Tensor, "c k"]:
    """‖y_i − s_i⊙Σ_h a_hij·vo_hj‖₁."""
    return (y[:, None, :] - _transformed(s, a, vo)).abs().sum(-1)


def l2_tokens(y: Tensor, s: Tensor, a: Tensor, vo: Tensor) -> Float[Tensor, "c k"]:
    """‖y_i − s_i⊙Σ_h a_hij·vo_hj‖₂."""
    return (y[:, None, :] - _transformed(s, a, vo)).square().sum(-1).sqrt()


def koba_tokens(y: Tensor, s: Tensor, a: Tensor, vo: Tensor) -> Float[Tensor, "c k"]:
    """‖s_i⊙Σ_h a_hij·vo_hj‖₂ (y is unused; same signature as the others)."""
    return _transformed(s, a, vo).square().sum(-1).sqrt()


KERNELS: dict[str, Callable[..., object]] = {
    "l1+heads": l1_heads_and_tokens,
    "l1": l1_tokens,
    "l2": l2_tokens,
    "koba": koba_tokens,
}


# Eager versions: the same quantities through batched matmuls and in-place reductions
# (faster than running the unrolled kernels eagerly; they hold [h, c, k, d] or [c, k, d]).
def _eager_transformed(s: Tensor, a: Tensor, vo: Tensor) -> Tensor:
    return torch.einsum("hck,hkd->ckd", a, vo).mul_(s[:, None, :])


def _eager_l1_heads_and_tokens(y: Tensor, s: Tensor, a: Tensor, vo: Tensor) -> tuple[Tensor, Tensor]:
    part = a[..., None] * vo[:, None]  # [h, c, k, d]
    part.mul_(s[None, :, None, :])
    tokens = (y[:, None, :] - part.sum(0)).abs_().sum(-1)
    return part.sub_(y[None, :, None, :]).abs_().sum(-1), tokens


EAGER: dict[str, Callable[..., object]] = {
    "l1+heads": _eager_l1_heads_and_tokens,
    "l1": lambda y, s, a, vo: _eager_transformed(s, a, vo).sub_(y[:, None, :]).abs_().sum(-1),
    "l2": lambda y, s, a, vo: _eager_transformed(s, a, vo).sub_(y[:, None, :]).square_().sum(-1).sqrt_(),
    "koba": lambda y, s, a, vo: _eager_transformed(s, a, vo).square_().sum(-1).sqrt_(),
}

_compiled: dict[str, Callable[..., object]] = {}
_compile_failed: str | None = None
# (kernel, dtype, device type) that ran compiled in this process: no compile cost left.
_warm: set[tuple[str, torch.dtype, str]] = set()


def is_warm(name: str, dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether the compiled kernel `name` already ran for this dtype and device type in this process."""
    return (name, dtype, torch.device(device).type) in _warm


def compile_cache_dir() -> str:
    """Where torch.compile keeps its artefacts: TORCHINDUCTOR_CACHE_DIR, set to lens_alti's cache if unset."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        from lens_alti.models.pretrained import _cache_root

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(_cache_root() / "torchinductor")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def compile_available() -> bool:
    """False once compilation failed in this process, or when LENS_ALTI_NO_COMPILE is set."""
    return _compile_failed is None and not os.environ.get("LENS_ALTI_NO_COMPILE")


def get_kernel(name: str, compiled: bool | str) -> Callable[..., Any]:
    """The kernel `name` for a backend: "native" (C, CPU), "compiled"/True (torch.compile,
    dynamic shapes: no recompilation per sequence length) or "eager"/False.

    Compiled kernels want fresh (non-view) tensors with every dimension > 1: views and
    sizes of 1 add guards that trigger recompilation. Other calls go to the eager kernel,
    as do native calls on tensors the C kernels do not take (CUDA, half precision).
    """
    if compiled == "native":
        from lens_alti.alti import native

        if native.available():
            return _native_with_fallback(name, native.kernel(name))
        compiled = compile_available()
    if compiled == "eager" or not compiled or not compile_available():
        return EAGER[name]
    if name not in _compiled:
        compile_cache_dir()
        _compiled[name] = _with_fallback(name, torch.compile(KERNELS[name], dynamic=True))
    return _compiled[name]


def _native_with_fallback(name: str, fn: Callable[..., object]) -> Callable[..., object]:
    from lens_alti.alti import native

    eager = EAGER[name]

    def run(*args: Tensor) -> object:
        return fn(*args) if native.supports(*args) else eager(*args)

    return run


def _no_duck_shapes() -> Any:
    """Keep equal sizes symbolically distinct (else a guard such as `c == k` recompiles later)."""
    try:
        import torch.fx.experimental._config as fx_config

        return fx_config.patch(use_duck_shape=False)  # type: ignore[attr-defined]  # added at run time by install_config_module
    except (ImportError, AttributeError):  # pragma: no cover - private API of this torch version
        return contextlib.nullcontext()


def _with_fallback(name: str, compiled_fn: Callable[..., object]) -> Callable[..., object]:
    eager = EAGER[name]

    def run(*args: Tensor) -> object:
        global _compile_failed
        if _compile_failed is not None or min(min(t.shape) for t in args) <= 1:
            return eager(*args)
        try:
            with _no_duck_shapes():
                out = compiled_fn(*args)
            _warm.add((name, args[0].dtype, args[0].device.type))
            return out
        except Exception as exc:  # no C++ compiler, unsupported platform, ...
            _compile_failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            warnings.warn(
                f"lens_alti: torch.compile is unavailable ({_compile_failed}); using the eager kernels, "
                "which give the same numbers more slowly. Set LENS_ALTI_NO_COMPILE=1 to skip the attempt.",
                RuntimeWarning,
                stacklevel=3,
            )
            return eager(*args)

    return run
