"""Run in the TransformerLens 4.x environment (.venv) by tests_tl3/test_same_weights.py.

    .venv/bin/python tests_tl3/bridge_alti.py DIR

DIR holds `tokenizer/`, one saved Hugging Face model per architecture (`gpt2/`, `neox/`,
`llama/`, `bert/`, `t5/`) and `inputs.pt` (token ids). For each model this boots a
TransformerBridge, computes lens_alti.attribute(cache, heads=True) in float32 and float64 and
writes the result tensors to `DIR/bridge.pt`, for comparison with the HookedTransformer numbers on the same weights.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import sys
import warnings

import torch

import lens_alti


def result_fields(res: lens_alti.AltiResult | lens_alti.Seq2SeqAltiResult) -> dict[str, torch.Tensor]:
    """The tensors compared across versions."""
    if isinstance(res, lens_alti.Seq2SeqAltiResult):
        return {
            "encoder": res.encoder.layers, "encoder_rollout": res.encoder.rollout, "decoder_self": res.decoder_self,
            "cross": res.cross, "cross_heads": res.cross_heads, "total": res.total,
        }
    return {"layers": res.layers, "rollout": res.rollout, "heads": res.heads, "heads_residual": res.heads_residual}


def main(folder: pathlib.Path) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.simplefilter("ignore")
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    auto = {"bert": transformers.AutoModelForMaskedLM, "t5": transformers.AutoModelForSeq2SeqLM}
    tok = transformers.AutoTokenizer.from_pretrained(folder / "tokenizer")
    inputs = torch.load(folder / "inputs.pt")
    out: dict[str, torch.Tensor | str] = {"transformer_lens": importlib.metadata.version("transformer-lens")}
    for path in sorted(p for p in folder.iterdir() if (p / "config.json").exists()):
        arch = path.name
        hf = auto.get(arch, transformers.AutoModelForCausalLM).from_pretrained(path).eval()
        bridge = TransformerBridge.boot_transformers(arch, hf_model=hf, tokenizer=tok, device="cpu")
        with torch.no_grad():
            if arch == "t5":
                _, cache = bridge.run_with_cache(inputs["src"], decoder_input=inputs["tgt"])
            else:
                _, cache = bridge.run_with_cache(inputs["ids"])
        for dtype in (torch.float32, torch.float64):
            res = lens_alti.attribute(cache, heads=True, dtype=dtype)
            out.update({f"{arch}.{dtype}.{k}": v for k, v in result_fields(res).items()})
        out[f"{arch}.weight_processing"] = res.weight_processing
    torch.save(out, folder / "bridge.pt")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
