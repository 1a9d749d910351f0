"""Where lens_alti keeps files between processes: one cache folder, read from the environment.

- `cache_root()`: `$LENS_ALTI_CACHE`, else `$XDG_CACHE_HOME/lens_alti`, else `~/.cache/lens_alti`;
- `kernels_dir()`: the native CPU kernels built from `lens_alti/alti/_native.c` (`kernels/`);
- `torchinductor_dir()`: torch.compile's artefacts of lens_alti's compiled kernels (`torchinductor/`),
  used only while lens_alti's own compiled kernels run and only where `TORCHINDUCTOR_CACHE_DIR` is unset;
- the converted pretrained weights (`lens_alti.models.pretrained`) sit directly under the root.

These functions only read the environment (at each call, so a change takes effect at once); nothing here
writes to it or creates a folder.
"""

from __future__ import annotations

import os
import pathlib

__all__ = ["cache_root", "kernels_dir", "torchinductor_dir"]


def cache_root() -> pathlib.Path:
    """lens_alti's cache folder: $LENS_ALTI_CACHE, else $XDG_CACHE_HOME/lens_alti, else ~/.cache/lens_alti."""
    explicit = os.environ.get("LENS_ALTI_CACHE")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "lens_alti"


def kernels_dir() -> pathlib.Path:
    """Where the native CPU kernels are built (`<cache root>/kernels`)."""
    return cache_root() / "kernels"


def torchinductor_dir() -> pathlib.Path:
    """torch.compile's cache for lens_alti's compiled kernels (`<cache root>/torchinductor`)."""
    return cache_root() / "torchinductor"
