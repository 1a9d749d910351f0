"""Draw docs/figures/attention_sink.svg from SmolLM2-135M (runs offline, ~20 s; needs matplotlib).

    HF_HUB_OFFLINE=1 .venv/bin/python docs/figures/make_sink_figure.py

For the demo's prompt "When Mary and John went to the store, John gave a drink to": left, the
attention each position receives from the later ones (mean over the 270 heads): the prepended
`<|im_start|>` takes most of it, the attention sink (docs/spec.md §10); right, contrastive
ALTI-Logit (" Mary" − " John") of each input token, the sink grey and apart from the content.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import lens_alti  # noqa: E402
from lens_alti.models.pretrained import load_smollm2  # noqa: E402

OUT = Path(__file__).parent / "attention_sink.svg"
TEXT = "When Mary and John went to the store, John gave a drink to"


def main() -> None:
    model = load_smollm2()
    tokens = model.to_tokens(TEXT)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    attr = lens_alti.logit_attribution(cache, " Mary", " John", tokens=tokens)
    att = lens_alti.attribute(cache, measure="attention")  # per layer, head-mean attention [1, L, q, k]
    n = tokens.shape[1]
    later = torch.tril(torch.ones(n, n), -1)  # receivers i > j
    received = (att.layers[0].mean(0) * later).sum(0) / later.sum(0).clamp(min=1)
    labels = [repr(t) for t in attr.str_tokens[0]]
    sink = attr.sinks[0].tolist()
    grey, blue, red = "#a0aec0", "#2b6cb0", "#c53030"
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    axes[0].bar(range(n - 1), received[: n - 1].tolist(), color=[grey if s else blue for s in sink[: n - 1]])
    axes[0].set_title("attention each token receives from later ones\n(mean over all 270 heads)")
    values = attr.tokens[0].tolist()
    axes[1].bar(range(n), values, color=[grey if s else blue if v >= 0 else red for s, v in zip(sink, values,
                                                                                                strict=True)])
    (pos, tok, val), = attr.top_tokens(1)
    axes[1].set_title(f"ALTI-Logit of ' Mary' − ' John' per input token: the sink (grey, {float(attr.sink[0]):+.2f})\n"
                      f"is reported apart; among the content {tok!r} ({val:+.2f}) comes first")
    for ax, k in ((axes[0], n - 1), (axes[1], n)):
        ax.set_xticks(range(k))
        ax.set_xticklabels(labels[:k], rotation=60, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
