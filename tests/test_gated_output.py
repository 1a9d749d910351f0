"""Qwen3-Next / Qwen3.5 attention layers gate each channel of the heads' output before o_proj.

Booting a bridge wraps q_proj / o_proj in LinearBridge components, which once hid the gate from
`has_output_gate`: the layers were then decomposed as plain attention and failed the
reconstruction check by 0.25–0.66 (or, with `check=False`, gave wrong numbers). They must be
refused with an UnsupportedModelError that names the per-channel gate.
"""

from __future__ import annotations

import pytest
import torch

import lens_alti
from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.gated_output import has_output_gate
from lens_alti.reading.layer_kinds import original
from tests.mixer_models import build_mixer_bridge

# Layer 0 is gated DeltaNet, layer 1 the gated full attention.
ARCHS = ("qwen3_next", "qwen3_5")


@pytest.fixture(scope="module", params=ARCHS)
def bridge(request):
    return build_mixer_bridge(request.param)[1]


def _tokens() -> torch.Tensor:
    return torch.randint(4, 1000, (1, 5), generator=torch.Generator().manual_seed(2))


def test_gate_is_detected_through_bridge_wrappers(bridge):
    attn = bridge.blocks[1].attn
    assert not isinstance(original(attn).q_proj, torch.nn.Linear)  # the bridge wrapped it
    assert has_output_gate(original(attn), attn)


@pytest.mark.parametrize("check", [True, False])
def test_per_channel_gate_is_refused_by_name(bridge, check):
    """Refused before any arithmetic on the gated layer, with or without the reconstruction check."""
    _, cache = bridge.run_with_cache(_tokens())
    with pytest.raises(UnsupportedModelError, match=r"blocks\.1\.attn: the attention output is gated per channel"):
        lens_alti.attribute(cache, check=check)
