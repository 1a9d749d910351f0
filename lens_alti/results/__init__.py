"""Every result object lens_alti returns, and saving / loading them.

- `alti`: `AltiResult` (decoder-only and encoder models) and `Seq2SeqAltiResult` (encoder-decoders), from `attribute`;
- `logit`: `LogitAttribution`, from `logit_attribution`;
- `routes`: `Routes`, from `routes`, and its graph's `Node`;
- `context`: `ContextAttribution`, from `context_attribution`;
- `saving`: `result.save(path)` and `load(path)` (safetensors with a JSON header).
"""

from lens_alti.results.alti import AltiResult, Seq2SeqAltiResult
from lens_alti.results.context import ContextAttribution
from lens_alti.results.logit import LogitAttribution
from lens_alti.results.routes import Node, Routes
from lens_alti.results.saving import load

__all__ = ["AltiResult", "ContextAttribution", "LogitAttribution", "Node", "Routes", "Seq2SeqAltiResult", "load"]
