"""Greedy continuation of a prompt, for `context_attribution` when no response is given.

The model's own `generate`, without its key-value cache: one forward pass over the whole sequence
per new token. TransformerLens 4.3's `TransformerBridge.generate(use_past_kv_cache=False)` continues
prompts of grouped-query models (LLaMA, Gemma-2; SmolLM2-135M: "Al-----" where a forward pass per
token gives "Alma Dawson was born in") with wrong tokens, and so does `generate` of the Hugging Face
model inside the bridge (`original_model`); GPT-2 and GPT-NeoX are unaffected.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def greedy_continuation(model: Any, prompt_ids: Tensor, max_new_tokens: int, eos: int | None) -> list[int]:
    """Up to `max_new_tokens` greedy tokens after `prompt_ids` `[1, n]`, ending before `eos` (not included)."""
    with torch.no_grad():
        out = model.generate(
            prompt_ids, max_new_tokens=max_new_tokens, do_sample=False, stop_at_eos=eos is not None,
            verbose=False, return_type="tokens", use_past_kv_cache=False,
        )
    new = [int(t) for t in out[0, prompt_ids.shape[1] :].tolist()]
    return new[: new.index(eos)] if eos is not None and eos in new else new
