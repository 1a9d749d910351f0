"""The registry sweep (tests/support/architecture_sweep.py): every architecture gives a result or a LensAltiError.

The fast subset runs in-process on a few architectures that cover each outcome; the whole
registry (one worker process per group of architectures) is marked slow.
"""

from __future__ import annotations

import functools

import pytest

from tests.support.architecture_sweep import BUG, REFUSED, TIMEOUT, WORKS, markdown, run_one, sweep, text_architectures

FAST = {
    "GPT2LMHeadModel": WORKS,
    "DeepseekV2ForCausalLM": WORKS,  # multi-head latent attention: head-major hook_v
    "MambaForCausalLM": WORKS,  # a linear-recurrent mixer, decomposed by reading.mixers
    "RecurrentGemmaForCausalLM": WORKS,  # RG-LRU and local attention recomputed, checked through the MLP
    # hook_pattern holds the position bias: the pattern is recomputed from hook_q / hook_k (reading/relative_bias)
    "SwitchTransformersForConditionalGeneration": WORKS,
    "LEDForConditionalGeneration": WORKS,  # banded encoder attention expanded to keys (reading/banded)
    "JetMoeForCausalLM": REFUSED,  # no hook_v in the bridge
    "HrmTextForCausalLM": REFUSED,  # block stacks called several times per forward pass
}


_run = functools.cache(run_one)


@pytest.mark.parametrize("name", sorted(FAST))
def test_fast_subset(name):
    out = _run(name)
    assert out.outcome == FAST[name], out.reason


def test_refusals_name_the_reason():
    assert "hook_v" in _run("JetMoeForCausalLM").reason
    hrm = _run("HrmTextForCausalLM").reason
    assert "UnsupportedModelError" in hrm and "L_blocks" in hrm and "only the last call" in hrm


@pytest.mark.slow
def test_whole_registry_has_no_bug():
    results = sweep(text_architectures(), timeout=300)
    table = markdown(results)
    print(table)
    bugs = [r for r in results if r.outcome in (BUG, TIMEOUT)]
    assert not bugs, "\n".join(f"{r.architecture}: {r.outcome} {r.reason}" for r in bugs)
