"""The one accessor for renamed transformers / TransformerLens attributes (lens_alti.reading.spellings)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.norms import norm_params
from lens_alti.reading.spellings import SPELLINGS, norm_eps, spelled


@pytest.mark.parametrize("name", SPELLINGS["eps"])
def test_every_known_spelling_of_eps_is_read(name):
    assert norm_eps(SimpleNamespace(**{name: 1e-5})) == 1e-5


def test_the_first_spelling_present_wins_and_none_counts_as_absent():
    assert spelled(SimpleNamespace(eps=None, variance_epsilon=2e-6), "eps") == 2e-6
    assert spelled(SimpleNamespace(out_proj=None, o_proj="o"), "out_proj") == "o"


def test_missing_attribute_names_the_module_and_every_spelling_tried():
    class FancyNorm:
        pass

    with pytest.raises(UnsupportedModelError) as err:
        norm_eps(FancyNorm())
    message = str(err.value)
    assert "FancyNorm" in message
    assert all(f"`{name}`" in message for name in SPELLINGS["eps"])


def test_default_is_returned_when_no_spelling_is_present():
    assert spelled(SimpleNamespace(), "wrapped", "self") == "self"


def test_a_norm_renamed_to_variance_epsilon_is_linearised():
    """transformers 5.25 renamed Gemma-4's RMSNorm `eps` to `variance_epsilon`: the reader follows."""

    class RenamedRMSNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, 8))
            self.variance_epsilon = 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x / (x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon).sqrt() * self.weight

    kind, weight, bias, eps = norm_params(RenamedRMSNorm(), "blocks.0.ln2", "RMS")
    assert (kind, bias, eps) == ("rmsnorm", None, 1e-6)
    torch.testing.assert_close(weight, torch.linspace(0.5, 1.5, 8))
