"""The native CPU kernels: `_native.c`, built once per machine with the system C compiler.

No JIT at call time: the shared library is compiled once per machine, the first time a
call needs it (about two seconds with gcc; one line on the `lens_alti.alti.native` logger,
level WARNING, says so, once per process) or ahead of time with `lens-alti build-kernels`
(`build()`). It goes to `lens_alti.kernels_dir()` (`$LENS_ALTI_CACHE/kernels`, else
`$XDG_CACHE_HOME/lens_alti/kernels`, else `~/.cache/lens_alti/kernels`), under a name that
hashes the source, the flags and the CPU, and later processes load it with ctypes within
milliseconds. Importing this module builds nothing and starts nothing. Where no compiler
exists, the build fails, or `LENS_ALTI_NO_NATIVE` is set, `available()` is False and
callers use the torch kernels (same numbers).

The kernels take the same `(y, s, a, vo)` tiles as `lens_alti.alti.kernels` and return
the same distances; the C source documents the tiling.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from lens_alti.paths import kernels_dir

_LOG = logging.getLogger(__name__)
SOURCE = pathlib.Path(__file__).with_name("_native.c")
# -fopenmp: threads from torch's own OpenMP pool (the library's libgomp.so.1 resolves to the copy
# torch loaded); the kernels are vectorised by hand, so the auto-vectorisers are off (they only
# tripled the build time). Where these flags fail (e.g. clang without libomp) the build is retried
# with FALLBACK_FLAGS, which use pthreads.
FLAGS = (
    "-O3", "-march=native", "-fopenmp", "-fno-tree-loop-vectorize", "-fno-tree-slp-vectorize", "-shared", "-fPIC",
    "-pthread", "-fno-math-errno",
)  # fmt: skip
FALLBACK_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-pthread", "-fno-math-errno")
MODES = {"l1+heads": 0, "l1": 1, "l2": 2, "koba": 3}
ABI_VERSION = 1
# Below this many h·c·k·d elements one thread does the tile (starting threads costs ~50 µs).
_THREAD_MIN_WORK = 1 << 21

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None
_announced = False  # the one line saying that the library is being built was logged in this process
BUILD_MESSAGE = "lens_alti: building the native CPU kernels once for this machine (about 2 s); cached at %s"


def _cpu_id() -> str:
    """What `-march=native` depends on: the CPU model and its flags."""
    info = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    info += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return info


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "gcc", "cc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def library_path(compiler: str) -> pathlib.Path:
    """Where the library for this source, compiler, flags and CPU is cached."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *FLAGS)).encode() + _cpu_id().encode())
    return kernels_dir() / f"lens_alti_native_{key.hexdigest()[:16]}.so"


def _build(compiler: str, target: pathlib.Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob("*.tmp"):  # left by a process that exited mid-build
        try:
            if time.time() - stale.stat().st_mtime > 3600:
                stale.unlink()
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        for flags in (FLAGS, FALLBACK_FLAGS):
            cmd = [compiler, *flags, "-o", tmp, str(SOURCE)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                break
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[:500]}")
        os.replace(tmp, target)  # atomic: concurrent processes never load a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _announce(path: pathlib.Path) -> None:
    """Say, once per process, that the caller waits for the build (the only slow step)."""
    global _announced
    if not _announced:
        _announced = True
        _LOG.warning(BUILD_MESSAGE, path)


def _load() -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler (gcc, cc or clang) on PATH")
    path = library_path(compiler)
    if not path.is_file():
        _announce(path)
        _build(compiler, path)
    lib = ctypes.CDLL(str(path))
    if lib.lens_alti_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path} has ABI {lib.lens_alti_abi_version()}, expected {ABI_VERSION}")
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    for suffix, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        tile = getattr(lib, f"lens_alti_tile_{suffix}")
        tile.argtypes = [i64] * 4 + [ptr, i64, ptr, i64, ptr, i64, i64, ptr, i64, i64, ptr, ptr, cint, cint]
        tile.restype = cint
        roof = getattr(lib, f"lens_alti_roofline_{suffix}")
        roof.argtypes = [ptr, ptr, i64, i64, cint]
        roof.restype = real
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded library (building it on first use), or None where it cannot be built."""
    global _lib, _failed
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is None and _failed is None:
            if os.environ.get("LENS_ALTI_NO_NATIVE"):
                _failed = "LENS_ALTI_NO_NATIVE is set"
            else:
                try:
                    _lib = _load()
                except Exception as exc:  # no compiler, read-only cache, foreign platform, ...
                    _failed = f"{type(exc).__name__}: {exc}"
                    _LOG.info("lens_alti native kernels unavailable (%s); using the torch kernels", _failed)
    return _lib


def possible() -> bool:
    """Whether the native kernels may be tried here: loaded, or not disabled, not failed, and a C
    compiler exists (the library may still have to be built: see `ready_on_disk`)."""
    if _lib is not None:
        return True
    return _failed is None and not os.environ.get("LENS_ALTI_NO_NATIVE") and _compiler() is not None


def loaded() -> bool:
    """Whether the library is loaded in this process."""
    return _lib is not None


def ready_on_disk() -> bool:
    """Whether the library for this source, compiler and CPU is already built in the cache."""
    compiler = _compiler()
    try:
        return compiler is not None and library_path(compiler).is_file()
    except (OSError, RuntimeError):  # unreadable cache, no home directory
        return False


def build() -> tuple[pathlib.Path, bool]:
    """Build the library now unless it is built already, and load it (`lens-alti build-kernels`).

    Returns its path and whether this call built it (False: it was built before, by an earlier
    process or call). Raises RuntimeError where the native kernels cannot be used: LENS_ALTI_NO_NATIVE
    is set, there is no C compiler, or the build or the load failed (the message says why).
    """
    if os.environ.get("LENS_ALTI_NO_NATIVE"):
        raise RuntimeError("LENS_ALTI_NO_NATIVE is set: the native kernels are disabled (unset it to build them)")
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler (gcc, cc or clang) on PATH; lens_alti uses the torch kernels instead")
    path = library_path(compiler)
    built = not path.is_file()
    if built:
        _announce(path)
        try:
            _build(compiler, path)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            raise RuntimeError(f"the native kernels could not be built: {type(exc).__name__}: {exc}") from exc
    if library() is None:
        raise RuntimeError(f"the native kernels could not be loaded: {_failed}")
    return path, built


def available() -> bool:
    """Whether the native kernels can run here (builds them on first call)."""
    return library() is not None


def failure() -> str | None:
    """Why the native kernels are unavailable (None if they are, or were not tried yet)."""
    return _failed


def supports(*tensors: Tensor) -> bool:
    """CPU tensors of one float32/float64 dtype, each with a contiguous last dimension."""
    dtype = tensors[0].dtype
    return dtype in (torch.float32, torch.float64) and all(
        t.device.type == "cpu" and t.dtype == dtype and t.dim() >= 1 and (t.shape[-1] <= 1 or t.stride(-1) == 1)
        for t in tensors
    )


def _last_contiguous(t: Tensor) -> Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def tile(
    mode: str,
    y: Float[Tensor, "c d"],
    s: Float[Tensor, "c d"] | None,
    a: Float[Tensor, "h c k"],
    vo: Float[Tensor, "h k d"],
    threads: int | None = None,
) -> tuple[Float[Tensor, "h c k"], Float[Tensor, "c k"]] | Float[Tensor, "c k"]:
    """Distances of one tile (see `lens_alti.alti.kernels`); `s=None` means a scale of 1.

    `mode` "l1+heads" returns (per-head L1, token L1); "l1", "l2", "koba" the token
    distances. Views are fine as long as the last dimension is contiguous.
    """
    lib = library()
    if lib is None:
        raise RuntimeError(f"native kernels unavailable: {_failed}")
    y, a, vo = _last_contiguous(y), _last_contiguous(a), _last_contiguous(vo)
    s = None if s is None else _last_contiguous(s)
    h, c, k = a.shape
    d = y.shape[-1]
    heads = mode == "l1+heads"
    tokens = y.new_empty(c, k)
    per_head = y.new_empty(h, c, k) if heads else tokens
    if threads is None:
        threads = torch.get_num_threads() if h * c * k * d >= _THREAD_MIN_WORK else 1
    suffix = "f32" if y.dtype == torch.float32 else "f64"
    fn = getattr(lib, f"lens_alti_tile_{suffix}")
    status = fn(
        h, c, k, d,
        y.data_ptr(), y.stride(0),
        None if s is None else s.data_ptr(), 0 if s is None else s.stride(0),
        a.data_ptr(), a.stride(0), a.stride(1),
        vo.data_ptr(), vo.stride(0), vo.stride(1),
        per_head.data_ptr(), tokens.data_ptr(), MODES[mode], threads,
    )  # fmt: skip
    if status != 0:
        raise MemoryError(f"lens_alti native kernel: could not allocate {4 * d * y.element_size()} bytes per thread")
    return (per_head, tokens) if heads else tokens


def kernel(name: str) -> Callable[..., object]:
    """A `(y, s, a, vo)` kernel with the signature of `lens_alti.alti.kernels.KERNELS[name]`."""
    if name not in MODES:
        raise KeyError(f"no native kernel {name!r}; expected one of {', '.join(MODES)}")

    def run(y: Tensor, s: Tensor, a: Tensor, vo: Tensor) -> object:
        return tile(name, y, s, a, vo)

    run.__name__ = f"native_{name.replace('+', '_')}"
    return run


def roofline(y: Tensor, v: Tensor, reps: int, threads: int) -> None:
    """Run the minimal L1 loop `Σ_d |y_d − w·v_d|` over `y`, `v` (`[d]`, in L1) `reps` times per thread.

    Elements processed: `reps · threads · d`. Used by the benchmark as the measured ceiling.
    """
    lib = library()
    if lib is None:
        raise RuntimeError(f"native kernels unavailable: {_failed}")
    y, v = y.contiguous(), v.contiguous()
    suffix = "f32" if y.dtype == torch.float32 else "f64"
    getattr(lib, f"lens_alti_roofline_{suffix}")(y.data_ptr(), v.data_ptr(), y.shape[-1], reps, threads)
