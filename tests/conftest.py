import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.support.models import DECODER_ARCHS, build_bridge  # noqa: E402


@pytest.fixture(scope="session", params=DECODER_ARCHS)
def decoder(request):
    """(arch name, hf model, bridge) for each tiny random decoder-only architecture."""
    torch.manual_seed(0)
    hf, bridge = build_bridge(request.param)
    return request.param, hf, bridge
