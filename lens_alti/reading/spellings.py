"""The one place that knows how transformers and TransformerLens spell the attributes lens_alti reads.

Libraries rename attributes between releases (transformers 5.25 calls Gemma-4's RMSNorm epsilon
`variance_epsilon`, earlier releases `eps`). Readers ask for a *meaning* ("eps") and get whichever
known spelling the module has, or an error that names the module and every spelling tried.
"""

from __future__ import annotations

from typing import Any

from lens_alti.errors import UnsupportedModelError

# meaning -> attribute names, in the order they are tried.
SPELLINGS: dict[str, tuple[str, ...]] = {
    "eps": ("eps", "variance_epsilon", "epsilon", "layer_norm_eps", "layer_norm_epsilon", "rms_norm_eps"),
    "wrapped": ("_original_component", "original_component"),  # the HF module inside a bridge component
    "out_proj": ("out_proj", "o_proj"),
    "out_norm": ("norm", "o_norm"),
}

_MISSING = object()


def spelled(module: Any, meaning: str, default: Any = _MISSING) -> Any:
    """`module`'s attribute for `meaning` under any of its known spellings.

    An attribute that exists but is None counts as absent. Without `default`, a module that has
    none of the spellings raises UnsupportedModelError naming the module's class and the names tried.
    """
    names = SPELLINGS[meaning]
    for name in names:
        value = getattr(module, name, None)
        if value is not None:
            return value
    if default is not _MISSING:
        return default
    tried = ", ".join(f"`{n}`" for n in names)
    raise UnsupportedModelError(
        f"{type(module).__name__}: has no attribute for {meaning!r} under any known spelling ({tried}); "
        "a newer transformers or TransformerLens may have renamed it — please report the module and version"
    )


def norm_eps(module: Any) -> float:
    """The epsilon of a normalisation module (any known spelling), as a float."""
    return float(spelled(module, "eps"))
