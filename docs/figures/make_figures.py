"""Draw the figures of docs/concepts.md from the shipped toy translator (runs offline, ~10 s).

    HF_HUB_OFFLINE=1 .venv/bin/python docs/figures/make_figures.py     # needs matplotlib

Writes docs/figures/alti_plus_toy.svg: for one held-out sentence pair, the last decoder layer's
cross-attention weights (head mean), the ALTI+ `total` rows (source tokens, then target prefix)
and each prediction's source share, with the corpus' gold alignment links marked.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import lens_alti  # noqa: E402
from lens_alti.models.toy_translation import encode_batch, load_toy_translator  # noqa: E402
from lens_alti.models.toy_translation.evaluate import held_out_pairs  # noqa: E402

OUT = Path(__file__).parent / "alti_plus_toy.svg"


def main() -> None:
    model = load_toy_translator()
    pair = next(p for p in held_out_pairs(40) if 5 <= len(p.source) <= 7 and len(p.target) >= 5)
    b = encode_batch(model.tokenizer, [pair.source_text], [pair.target_text])
    with torch.no_grad():
        _, cache = model.run_with_cache(b.source, decoder_input=b.decoder_input)
    res = lens_alti.attribute(cache, tokens=b.source, decoder_tokens=b.decoder_input)
    assert isinstance(res, lens_alti.Seq2SeqAltiResult)
    src = [*pair.source, "</s>"]
    predicted = [*pair.target, "</s>"]  # decoder position t predicts target word t
    reads = ["<start>", *pair.target]  # ... and reads the word before it
    S, T = len(src), len(predicted)
    last = res.cross.shape[1] - 1
    attn = cache[f"decoder_blocks.{last}.cross_attn.hook_pattern"][0].mean(0)  # [T, S]
    total = res.total[0, -1]  # [T, S + T]
    share = res.source_contribution[0]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [S, S + T, 4]})
    rows = [f"{p}  ←  {r}" for p, r in zip(predicted, reads, strict=True)]

    def gold(ax: plt.Axes) -> None:
        for s, t in pair.sure:
            ax.scatter(s, t, s=70, facecolors="none", edgecolors="#d62728", linewidths=1.6)

    ax = axes[0]
    ax.imshow(attn.numpy(), cmap="Blues", vmin=0, vmax=1)
    gold(ax)
    ax.set_title(f"cross-attention weights\n(decoder layer {last + 1}, head mean)")
    ax.set_xticks(range(S), src, rotation=60, ha="right")
    ax.set_yticks(range(T), rows)
    ax.set_ylabel("predicted word  ←  decoder input")

    ax = axes[1]
    ax.imshow(total.numpy(), cmap="Blues", vmin=0, vmax=float(total.max()))
    gold(ax)
    ax.axvline(S - 0.5, color="k", linewidth=1)
    ax.set_title("ALTI+ total after the last decoder layer\nsource tokens | target prefix (rows sum to 1)")
    ax.set_xticks(range(S + T), [*src, *reads], rotation=60, ha="right")
    ax.set_yticks(range(T), [])

    ax = axes[2]
    ax.barh(range(T), share.numpy(), color="#4c72b0")
    ax.set_ylim(T - 0.5, -0.5)
    ax.set_xlim(0, 1)
    ax.set_yticks(range(T), [])
    ax.set_title("share of the source\nin each prediction")
    fig.suptitle(
        f"Toy translator, held-out pair: '{pair.source_text}' → '{pair.target_text}'  (red circles: gold sure links)",
        y=1.02,
    )
    fig.savefig(OUT, bbox_inches="tight")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
