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
artefacts go to a persistent cache, `lens_alti.paths.torchinductor_dir()` (`torchinductor/`
in lens_alti's cache folder), unless the user set TORCHINDUCTOR_CACHE_DIR (to anything but
torch's default, which torch writes there itself on first use), so a new process reuses
them instead of recompiling (see `lens_alti.alti.backend`). torch.compile reads its cache folder
only from that environment variable (torch 2.13 has no config option for it), so lens_alti sets
it only while its own compiled kernels run and restores the environment afterwards (torch also
sets variables of its own while compiling, which are undone too): the user's own torch.compile
calls keep their cache, and `os.environ` is the same after every lens_alti call as before it.
(Another thread reading the environment during such a call sees lens_alti's value.)

The diagonal residual term of self-attention is not included here: callers correct
those `c` entries afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from lens_alti.paths import torchinductor_dir


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


@functools.cache
def _torch_default_cache_dir() -> str | None:
    """torch's own default for TORCHINDUCTOR_CACHE_DIR (absolute), or None in a torch without it."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # pragma: no cover - another torch version
        return None
    return os.path.abspath(default_cache_dir())


def _users_compile_cache_dir() -> str | None:
    """$TORCHINDUCTOR_CACHE_DIR where the user chose it: None where it is unset, empty, or torch's default
    (torch writes its default there itself on first use, e.g. when transformers imports dynamo)."""
    value = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not value or os.path.abspath(value) == _torch_default_cache_dir():
        return None
    return value


@functools.lru_cache(maxsize=4)
def _our_compile_cache_dir(*environment: str | None) -> str:
    """`lens_alti.paths.torchinductor_dir()` as a string, memoised on the variables it reads (the arguments)."""
    return str(torchinductor_dir())


def compile_cache_dir() -> str:
    """Where lens_alti's compiled kernels keep their artefacts: $TORCHINDUCTOR_CACHE_DIR if the user chose
    it, else `lens_alti.paths.torchinductor_dir()`. Reads the environment, never writes it."""
    get = os.environ.get
    return _users_compile_cache_dir() or _our_compile_cache_dir(
        get("LENS_ALTI_CACHE"), get("XDG_CACHE_HOME"), get("HOME")
    )


def _environ() -> tuple[dict[Any, Any], Callable[[Any], str]]:
    """The environment's contents and how to decode their keys and values. CPython's encoded mapping
    copied in one step where it exists (no decoding, and atomic under the GIL: a compiled call checks
    it twice), else a copy of os.environ (retried if another thread changes it during the copy)."""
    data = getattr(os.environ, "_data", None)
    decode = getattr(os.environ, "decodevalue", None)
    if isinstance(data, dict) and callable(decode) and callable(getattr(os.environ, "decodekey", None)):
        return data.copy(), decode
    while True:  # pragma: no cover - not CPython
        try:
            return dict(os.environ), str
        except (KeyError, RuntimeError):  # a concurrent change
            continue


def _restore_environment(before: dict[Any, Any], after: dict[Any, Any], decode: Callable[[Any], str]) -> None:
    """Undo every change from `before` to `after` (snapshots of `_environ`) in os.environ."""
    decode_key: Callable[[Any], str] = getattr(os.environ, "decodekey", str) if decode is not str else str
    for key in after.keys() - before.keys():
        os.environ.pop(decode_key(key), None)
    for key, value in before.items():
        if after.get(key) != value:
            os.environ[decode_key(key)] = decode(value)


def _forget_inductor_cache_path() -> None:
    """Drop inductor's one memoised path under its cache folder (its local autotuning cache), so that
    neither lens_alti's compile nor the user's later ones use the other's folder."""
    codecache = sys.modules.get("torch._inductor.codecache")
    cached: Any = getattr(getattr(codecache, "CacheBase", None), "get_local_cache_path", None)
    if hasattr(cached, "cache_clear"):  # absent before the first compile, or in another torch version
        cached.cache_clear()


@contextlib.contextmanager
def _compile_environment() -> Iterator[None]:
    """Call torch.compile or a compiled kernel with torch.compile's cache in lens_alti's folder (unless the
    user chose one), then put back every environment variable that changed meanwhile: ours, and those torch
    sets itself (`TORCHINDUCTOR_CACHE_DIR` on its first use of the cache, when unset;
    `_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR` when it loads a kernel)."""
    before, decode = _environ()
    users = _users_compile_cache_dir()
    original = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        if users is None:
            # dynamo keeps one path under the cache folder from its import on (DynamoCache): imported here, before
            # our folder is set, it is torch's default, as it would be without lens_alti
            import torch._dynamo  # noqa: F401

            os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache_dir()
            _forget_inductor_cache_path()
        yield
    finally:
        if users is None:  # ours first (the usual and only change), then whatever else changed
            if original is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = original
            _forget_inductor_cache_path()
        after, _ = _environ()
        if after != before:
            _restore_environment(before, after, decode)


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
        with _compile_environment():  # torch.compile itself reads (and would set) the cache folder
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
            with _no_duck_shapes(), _compile_environment():
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
