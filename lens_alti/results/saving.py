"""Results on disk: `result.save(path)` and `lens_alti.load(path)`.

One `.safetensors` file per result: every tensor of the result under its attribute name
(`encoder.layers`, `reconstruction_error.cross`... for encoder-decoders), and a small JSON
document in the safetensors header under the key `"lens_alti"` holding everything else:
the class, measure, architecture, weight processing, token strings, the extra fields, the
format version and the lens_alti / TransformerLens / torch versions that wrote it. Any
safetensors reader can open the file (`safetensors.safe_open(path, "pt").metadata()`).

Format versions: a reader accepts files of its own `FORMAT_VERSION` or older; a newer
file raises `ResultFormatError` naming both versions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from importlib import metadata as importlib_metadata
from typing import Any

import torch
from torch import Tensor

from lens_alti.errors import ResultFormatError

FORMAT = "lens_alti.result"
FORMAT_VERSION = 1
_KEY = "lens_alti"
# The result classes `save` writes and `load` rebuilds, by name (filled by `savable`).
SAVABLE: dict[str, type] = {}


def savable(cls: type) -> type:
    """Class decorator: results of this dataclass can be saved and loaded (by its name)."""
    SAVABLE[cls.__name__] = cls
    return cls


def _version(dist: str) -> str | None:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of the packages whose behaviour the numbers depend on."""
    # The package is always loaded before its submodules: read its version without importing it back.
    return {
        "lens_alti": getattr(sys.modules.get("lens_alti"), "__version__", None),
        "transformer_lens": _version("transformer-lens") or _version("transformer_lens"),
        "torch": torch.__version__,
    }


def _split(result: Any, prefix: str = "") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors by flat name, JSON-able fields) of a result dataclass."""
    tensors: dict[str, Tensor] = {}
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        name = prefix + f.name
        if isinstance(value, Tensor):
            tensors[name] = value
        elif type(value) in SAVABLE.values():
            sub_t, sub_f = _split(value, name + ".")
            tensors.update(sub_t)
            fields[f.name] = sub_f
        elif isinstance(value, dict) and value and all(isinstance(v, Tensor) for v in value.values()):
            tensors.update({f"{name}.{k}": v for k, v in value.items()})
            fields[f.name] = {"__tensors__": list(value)}
        else:
            fields[f.name] = value
    return tensors, fields


def to_bytes_dict(result: Any) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors on the CPU, safetensors header metadata) of a result."""
    if type(result) not in SAVABLE.values():
        raise TypeError(f"expected one of {', '.join(SAVABLE)}, got {type(result).__name__}")
    tensors, fields = _split(result)
    try:
        header = json.dumps(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "class": type(result).__name__,
                "fields": fields,
                "versions": versions(),
            }
        )
    except TypeError as exc:
        raise ResultFormatError(
            f"the result holds a field that is neither a tensor nor JSON data ({exc}); "
            "keep `extra` to strings, numbers, lists and dicts"
        ) from exc
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for k, v in tensors.items():
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen else t  # safetensors refuses tensors that share memory
        seen.add(ptr)
    return out, {_KEY: header}


def save(result: Any, path: str | os.PathLike[str]) -> pathlib.Path:
    """Write `result` to `path` (a .safetensors file), atomically: a temporary file renamed when complete."""
    path = pathlib.Path(path)
    tensors, header = to_bytes_dict(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, tensors, header)
    return path


def write_atomic(path: pathlib.Path, tensors: dict[str, Any], header: dict[str, str]) -> None:
    """Write a .safetensors file under a temporary name and rename it when complete (never half-written)."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=header)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON metadata of a saved result (checked for format and version)."""
    from safetensors import safe_open

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved result at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ResultFormatError(f"{path} is not a safetensors file ({exc})") from exc
    if _KEY not in meta:
        raise ResultFormatError(f"{path} is a safetensors file but not a lens_alti result (no '{_KEY}' metadata)")
    header = json.loads(meta[_KEY])
    if header.get("format") != FORMAT:
        raise ResultFormatError(f"{path}: unknown format {header.get('format')!r} (expected {FORMAT!r})")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        wrote = (header.get("versions") or {}).get("lens_alti")
        raise ResultFormatError(
            f"{path} was written by lens_alti {wrote} in result format version {version}; this lens_alti "
            f"({versions()['lens_alti']}) reads format versions up to {FORMAT_VERSION}. Upgrade lens_alti to load it."
        )
    if header.get("class") not in SAVABLE:
        raise ResultFormatError(f"{path}: unknown result class {header.get('class')!r}")
    return header


def _build(cls: type, fields: dict[str, Any], tensors: dict[str, Tensor], prefix: str = "") -> Any:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if name in tensors:
            kwargs[f.name] = tensors[name]
        elif f.type in SAVABLE and isinstance(fields.get(f.name), dict):  # a nested result (Seq2Seq's encoder)
            kwargs[f.name] = _build(SAVABLE[str(f.type)], fields[f.name], tensors, name + ".")
        elif isinstance(fields.get(f.name), dict) and "__tensors__" in fields[f.name]:
            kwargs[f.name] = {k: tensors[f"{name}.{k}"] for k in fields[f.name]["__tensors__"]}
        elif f.name in fields:
            kwargs[f.name] = fields[f.name]
    return cls(**kwargs)


def load(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Any:
    """Read a result written by `result.save(path)` into its class, tensors on `device`."""
    from safetensors.torch import load_file

    header = read_header(path)
    tensors = load_file(str(path), device=str(device))
    return _build(SAVABLE[header["class"]], header["fields"], tensors)
