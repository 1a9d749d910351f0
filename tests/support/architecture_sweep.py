"""Sweep TransformerLens's TransformerBridge architecture registry with tiny random models.

For every text architecture of `transformer_lens.factories.architecture_adapter_factory.
SUPPORTED_ARCHITECTURES` whose class the installed transformers has, build a tiny random model
offline, boot it as a TransformerBridge and run `lens_alti.attribute` on it. The outcome is one of

- `works`: a result whose rows sum to 1 and whose padded batch equals the items run alone
  (attention layers and linear-recurrent mixer layers alike; `attribute` checks every block's
  reconstruction);
- `refused`: a `LensAltiError` subclass, named with its message in the reason;
- `TransformerLens fails`: building the model or booting / running the bridge failed before
  lens_alti was called (nothing lens_alti can do);
- `cannot build`: transformers cannot build the tiny config offline;
- `BUG`: any other exception raised by lens_alti, or a result that fails the checks.

Each architecture runs in a worker process (several per worker, a timeout per architecture).

    python -m tests.support.architecture_sweep --out docs/architectures.md [--only Gpt2LMHeadModel ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORKS = "works"
MIXER = "recurrent mixer (see mixers)"  # no longer produced: mixers are decomposed (reading.mixers)
REFUSED = "refused"
TL_FAILS = "TransformerLens fails"
CANNOT_BUILD = "cannot build"
BUG = "BUG"
TIMEOUT = "timeout"

# Registry entries that are not text models (vision, audio, multimodal wrappers) or that are
# TransformerLens-internal; the sweep lists them as skipped.
NOT_TEXT = {
    "ASTForAudioClassification": "audio",
    "AudioFlamingo3ForConditionalGeneration": "audio",
    "Emu3ForConditionalGeneration": "multimodal",
    "Florence2ForConditionalGeneration": "vision-language",
    "Gemma3ForConditionalGeneration": "multimodal",
    "Gemma3nForConditionalGeneration": "multimodal",
    "Gemma4ForConditionalGeneration": "multimodal",
    "Gemma4UnifiedForConditionalGeneration": "multimodal",
    "Glm4vForConditionalGeneration": "vision-language",
    "GlmAsrForConditionalGeneration": "audio",
    "HubertForCTC": "audio",
    "HubertModel": "audio",
    "Wav2Vec2ForCTC": "audio",
    "Wav2Vec2ForPreTraining": "audio",
    "Wav2Vec2Model": "audio",
    "Idefics3ForConditionalGeneration": "vision-language",
    "Llama4ForConditionalGeneration": "multimodal",
    "LlavaForConditionalGeneration": "vision-language",
    "LlavaNextForConditionalGeneration": "vision-language",
    "LlavaOnevisionForConditionalGeneration": "vision-language",
    "Mistral3ForConditionalGeneration": "vision-language",
    "MusicFlamingoForConditionalGeneration": "audio",
    "MuseGlimmerForConditionalGeneration": "multimodal",
    "Qwen2_5_VLForConditionalGeneration": "vision-language",
    "Qwen2AudioForConditionalGeneration": "audio",
    "Qwen3VLForConditionalGeneration": "vision-language",
    "Qwen3VLMoeForConditionalGeneration": "vision-language",
    "Qwen3_5ForConditionalGeneration": "multimodal",
    "Qwen3_5MoeForConditionalGeneration": "multimodal",
    "ViTModel": "vision",
    "ViTForImageClassification": "vision",
    "DeiTModel": "vision",
    "DeiTForImageClassification": "vision",
    "TransformerLensNative": "TransformerLens-internal",
    "TransformerLensPretrain": "TransformerLens-internal",
}

# Tiny sizes, applied to every config attribute of these names that the default config has.
_D, _H, _KV, _DH, _FF, _L = 64, 4, 2, 16, 128, 2
_SIZES: dict[str, Any] = {
    "hidden_size": _D, "d_model": _D, "n_embd": _D, "dim": _D, "n_embed": _D, "embed_dim": _D,
    "num_hidden_layers": _L, "n_layer": _L, "n_layers": _L, "num_layers": _L, "num_decoder_layers": _L,
    "encoder_layers": _L, "decoder_layers": _L,
    "num_attention_heads": _H, "n_head": _H, "n_heads": _H, "num_heads": _H,
    "encoder_attention_heads": _H, "decoder_attention_heads": _H,
    "num_key_value_heads": _KV, "num_kv_heads": _KV, "multi_query_group_num": _KV,
    "head_dim": _DH, "d_kv": _DH, "kv_channels": _DH,
    "intermediate_size": _FF, "d_ff": _FF, "n_inner": _FF, "ffn_dim": _FF, "encoder_ffn_dim": _FF,
    "decoder_ffn_dim": _FF, "ffn_hidden_size": _FF, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "moe_ffn_hidden_size": 32,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "top_k": 2, "moe_k": 2, "n_group": 1, "topk_group": 1,
    "n_shared_experts": 1,
    "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128, "max_seq_len": 128,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "first_k_dense_replace": 1,
    "attention_window": 4, "sliding_window": 64,
    "state_size": 8, "d_state": 8, "mamba_d_state": 8, "ssm_state_size": 8, "mamba_n_heads": 8,
    "mamba_d_head": 16, "mamba_d_ssm": 128, "mamba_head_dim": 16, "mamba_headdim": 16, "n_mamba_heads": 8,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "vocab_size_per_layer_input": 1000, "hidden_size_per_layer_input": 16,
    "lru_width": _D, "rotary_dim": 8,
    # Hybrids: one attention layer among the two tiny layers (a cache with no attention layer fails in HF).
    "attn_layer_indices": [1], "attn_layer_offset": 1, "attn_layer_period": 2, "conv1d_width": 4, "block_types": None,
}

# Configs whose defaults cannot build a model at all (transformers needs values they leave as None).
_CONFIG_EXTRA: dict[str, dict[str, Any]] = {
    "Lfm2MoeConfig": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
}

# What the table adds after an outcome's reason (facts checked elsewhere in the test suite).
NOTES: dict[str, str] = {
    "GraniteMoeHybridForCausalLM": (
        "(the default config has position_embedding_type=None, no rotary embedding, which the bridge's adapter "
        "expects; with position_embedding_type='rope' it boots and works: "
        "tests/reading/test_mixers.py, granite_moe_hybrid)"
    ),
}


@dataclass
class Outcome:
    architecture: str
    outcome: str
    reason: str
    seconds: float = 0.0


def text_architectures() -> list[str]:
    """Every registry name, in registry order (the worker decides what each one is)."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    return list(SUPPORTED_ARCHITECTURES)


def tiny_config(config_cls: Any) -> Any:
    """The default config of `config_cls` shrunk to tiny sizes (only attributes it has)."""
    import inspect

    default = config_cls()
    accepted = set(inspect.signature(config_cls.__init__).parameters)
    def has(name: str) -> bool:
        try:
            return hasattr(default, name)
        except Exception:  # noqa: BLE001 - e.g. per-layer attributes that refuse global access
            return True

    kwargs = {k: v for k, v in _SIZES.items() if k in accepted and has(k) and v is not None}
    kwargs.update(_CONFIG_EXTRA.get(config_cls.__name__, {}))
    if config_cls.__name__ == "T5Gemma2Config":
        return _t5gemma2_config(config_cls)
    for sub in ("text_config",):
        if getattr(default, sub, None) is not None:
            raise ValueError("multimodal config")
    from transformers import PretrainedConfig

    for sub in ("encoder", "decoder"):  # T5Gemma: one config per stack
        value = getattr(default, sub, None) if sub in accepted else None
        if isinstance(value, PretrainedConfig):
            kwargs[sub] = tiny_config(type(value)).to_dict()
    # Per-layer lists must match the new layer count.
    for name in ("layer_types", "layers_block_type", "block_types", "attention_layers", "hybrid_override_pattern"):
        if name not in accepted:
            continue
        try:
            value = getattr(default, name, None)
        except Exception:  # noqa: BLE001
            continue
        if isinstance(value, (list, str)) and len(value) > 0:
            kinds = list(dict.fromkeys(value))  # keep one of each kind, first layer's kind first
            if len(kinds) == 1 and name == "layer_types" and kinds[0] == "linear_attention":
                kinds = ["linear_attention", "attention"]  # a hybrid whose default lists one kind only
            seq = (kinds * _L)[: max(_L, len(kinds))]
            if "num_hidden_layers" in kwargs and len(seq) != kwargs["num_hidden_layers"]:
                kwargs["num_hidden_layers"] = len(seq)
            kwargs[name] = "".join(seq) if isinstance(value, str) else seq
    for k, v in (("pad_token_id", 3), ("bos_token_id", 1), ("eos_token_id", 2), ("decoder_start_token_id", 1)):
        if hasattr(default, k):
            kwargs[k] = v
    kwargs["vocab_size"] = 1000
    # A config that rejects a tiny size names the attribute: fall back to its default for it.
    for _ in range(len(kwargs)):
        try:
            return config_cls(**kwargs)
        except Exception as exc:  # noqa: BLE001
            named = [k for k in kwargs if k not in ("vocab_size", "num_hidden_layers") and f"'{k}'" in str(exc)]
            named = named or [k for k in kwargs if k not in ("vocab_size", "num_hidden_layers") and k in str(exc)]
            if not named:
                raise
            del kwargs[named[0]]
    return config_cls(**kwargs)


def _t5gemma2_config(config_cls: Any) -> Any:
    """T5Gemma2 as a text model: tiny text encoder and decoder; its encoder always builds a SigLIP
    vision tower, here a tiny one that text inputs never run."""
    from transformers.models.t5gemma2 import configuration_t5gemma2 as c

    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 16, "patch_size": 8}
    encoder = c.T5Gemma2EncoderConfig(
        text_config=tiny_config(c.T5Gemma2TextConfig).to_dict(), vision_config=vision, mm_tokens_per_image=4,
        boi_token_index=1001, eoi_token_index=1002,
    )
    return config_cls(
        encoder=encoder.to_dict(), decoder=tiny_config(c.T5Gemma2DecoderConfig).to_dict(), vocab_size=1000,
        pad_token_id=3, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        image_token_index=1003,  # image tokens outside the text vocabulary
    )


def _with_architecture(cfg: Any, name: str) -> Any:
    cfg.architectures = [name]
    return cfg


def build_tiny(name: str, seed: int = 0, **overrides: Any) -> tuple[Any, Any]:
    """(untouched copy of a tiny random Hugging Face model with randomised norms, its TransformerBridge).

    `overrides` are set on the tiny config (e.g. non-default multipliers).
    """
    import torch
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    from tests.support.reference import randomize_norms
    from tests.support.tokenizer import tokenizer_dir

    torch.manual_seed(seed)
    cls = getattr(transformers, name)
    cfg = _with_architecture(tiny_config(cls.config_class), name)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    hf = cls(cfg).eval()
    randomize_norms(hf, seed)
    untouched = copy.deepcopy(hf)  # booting wraps the model's modules in place
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir())
    return untouched, TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=tok, device="cpu")


def _tokens(n: int, length: int, seed: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 1000, (n, length), generator=g)


def _check_rows(res: Any) -> str | None:
    import torch

    layers = getattr(res, "layers", None)
    if layers is None:  # encoder-decoder: check the combined target rows
        layers = res.total
    s = layers.sum(-1)
    ok = torch.isclose(s, torch.ones_like(s), atol=1e-4) | (s == 0)
    if not bool(ok.all()) or bool((layers < -1e-6).any()):
        return "rows do not sum to 1 or are negative"
    return None


def _padding_check(bridge: Any, seq2seq: bool, attribute: Any) -> tuple[str, str] | None:
    """Run a right-padded batch of two items and each item alone; the real rows must agree.

    Returns None, or (outcome, reason): a BUG when lens_alti's rows differ although the model's
    own activations agree; TL_FAILS when padding already changes the model's activations.
    """
    import torch

    toks = _tokens(2, 7, 5)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    if seq2seq:
        tgt = _tokens(2, 5, 6)
        tgt[:, 0] = 1
        tmask = torch.ones(2, 5, dtype=torch.long)
        tmask[1, 4:] = 0
        _, cache = bridge.run_with_cache(toks, decoder_input=tgt, attention_mask=mask, decoder_attention_mask=tmask)
        batch = attribute(cache, attention_mask=mask, decoder_attention_mask=tmask)
        _, c1 = bridge.run_with_cache(toks[1:, :5], decoder_input=tgt[1:, :4])
        alone = attribute(c1)
        got, want = batch.total[1, :, :4, :], alone.total[0]
        got = torch.cat([got[..., :5], got[..., 7:11]], dim=-1)  # real sources, then real targets
    else:
        _, cache = bridge.run_with_cache(toks, attention_mask=mask)
        _, c1 = bridge.run_with_cache(toks[1:, :5])
        n = len(bridge.blocks) - 1
        names = [f"blocks.{n}.hook_resid_post", f"blocks.{n}.hook_out", f"blocks.{n}.hook_resid_pre"]
        last = next((k for k in names if k in cache.keys() and k in c1.keys()), None)
        if last is not None:
            drift = float((cache[last][1, :5] - c1[last][0]).abs().max())
            if drift > 1e-4 * max(1.0, float(c1[last].abs().max())):
                return TL_FAILS, (
                    f"padding changes the model's own activations (last residual by {drift:.2g}): the bridge does "
                    "not apply the attention mask as the unpadded run does; unpadded inputs work"
                )
        batch = attribute(cache, attention_mask=mask)
        alone = attribute(c1)
        got, want = batch.layers[1, :, :5, :5], alone.layers[0]
    err = float((got - want).abs().max())
    return None if err < 1e-4 else (BUG, f"padded batch differs from the item alone by {err:.2g}")


def run_one(name: str) -> Outcome:
    """Build, boot and attribute one architecture; classify what happened."""
    start = time.time()

    def done(outcome: str, reason: str) -> Outcome:
        reason = " ".join(str(reason).split())
        return Outcome(name, outcome, reason[:400], round(time.time() - start, 1))

    if name in NOT_TEXT:
        return done("skipped", f"not a text model ({NOT_TEXT[name]})")
    import torch
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        return done("skipped", f"transformers {transformers.__version__} has no class {name} (remote code)")
    try:
        torch.manual_seed(0)
        cfg = _with_architecture(tiny_config(cls.config_class), name)
        hf = cls(cfg).eval()
        from tests.support.reference import randomize_norms

        randomize_norms(hf, 0)
    except Exception as exc:  # noqa: BLE001 - classified, not hidden
        return done(CANNOT_BUILD, f"{type(exc).__name__}: {exc}")
    try:
        from transformer_lens.model_bridge import TransformerBridge

        from tests.support.tokenizer import tokenizer_dir

        tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir())
        bridge = TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=tok, device="cpu")
        seq2seq = hasattr(bridge, "encoder_blocks") and hasattr(bridge, "decoder_blocks")
        toks = _tokens(2, 6, 1)
        if seq2seq:
            tgt = _tokens(2, 4, 2)
            _, cache = bridge.run_with_cache(toks, decoder_input=tgt)
        else:
            _, cache = bridge.run_with_cache(toks)
    except Exception as exc:  # noqa: BLE001
        return done(TL_FAILS, f"{type(exc).__name__}: {exc}")
    import lens_alti
    from lens_alti.errors import LensAltiError

    try:
        res = lens_alti.attribute(cache)
        rows = _check_rows(res)
        problem = (BUG, rows) if rows else _padding_check(bridge, seq2seq, lens_alti.attribute)
    except LensAltiError as exc:
        msg = f"{type(exc).__name__}: {exc}"
        return done(REFUSED, msg)
    except Exception as exc:  # noqa: BLE001
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        return done(BUG, f"{type(exc).__name__}: {exc} (at {os.path.basename(tb.filename)}:{tb.lineno})")
    if problem:
        return done(*problem)
    err = float(res.reconstruction_error.max()) if hasattr(res, "reconstruction_error") and not isinstance(
        res.reconstruction_error, dict
    ) else max(float(v.max()) for v in res.reconstruction_error.values())
    return done(WORKS, f"max relative reconstruction error {err:.1e}")


def _worker(path: str, names: list[str]) -> None:
    """Run architectures one after another, appending one JSON line per event to `path`."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    for name in names:
        with open(path, "a") as f:
            f.write(json.dumps({"start": name, "time": time.time()}) + "\n")
        out = run_one(name)
        with open(path, "a") as f:
            f.write(json.dumps(out.__dict__) + "\n")


def sweep(names: list[str], timeout: float = 120.0, per_worker: int = 12, jobs: int = 2) -> list[Outcome]:
    """Run `names` in worker processes (`jobs` at a time); an architecture past `timeout` s is a timeout."""
    import tempfile

    pending = [names[i : i + per_worker] for i in range(0, len(names), per_worker)]
    results: dict[str, Outcome] = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    running: list[dict[str, Any]] = []
    tmp = tempfile.mkdtemp(prefix="lens_alti_sweep_")

    def launch(chunk: list[str]) -> None:
        path = os.path.join(tmp, f"{len(running)}-{time.time_ns()}.jsonl")
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.architecture_sweep", "--worker", path, *chunk],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )
        running.append({"proc": proc, "chunk": chunk, "path": path, "since": time.time(), "seen": 0})

    while pending or running:
        while pending and len(running) < jobs:
            launch(pending.pop(0))
        time.sleep(0.3)
        for item in list(running):
            proc = item["proc"]
            lines = open(item["path"]).read().splitlines() if os.path.exists(item["path"]) else []
            for line in lines[item["seen"] :]:
                event = json.loads(line)
                if "start" in event:
                    item["since"] = event["time"]
                else:
                    out = Outcome(**event)
                    results[out.architecture] = out
                    print(f"{out.architecture:42s} {out.outcome:22s} {out.seconds:5.1f}s {out.reason[:90]}", flush=True)
            item["seen"] = len(lines)
            finished = proc.poll() is not None
            if not finished and time.time() - item["since"] > timeout:
                proc.kill()
                proc.wait()
                finished = True
            if finished:
                running.remove(item)
                left = [n for n in item["chunk"] if n not in results]
                if left:
                    killed = proc.returncode == -9
                    results[left[0]] = Outcome(
                        left[0], TIMEOUT if killed else BUG,
                        f"over {timeout:.0f} s" if killed else f"the worker process died (code {proc.returncode})",
                    )
                    print(f"{left[0]:42s} {results[left[0]].outcome}", flush=True)
                    if left[1:]:
                        pending.insert(0, left[1:])
    return [results[n] for n in names if n in results]


def markdown(results: list[Outcome]) -> str:
    """The table as markdown, grouped by outcome, with a count line."""
    import transformers

    order = [WORKS, REFUSED, TL_FAILS, CANNOT_BUILD, BUG, TIMEOUT, "skipped"]
    tested = [r for r in results if r.outcome not in ("skipped", CANNOT_BUILD, TL_FAILS)]
    works = [r for r in tested if r.outcome == WORKS]
    count = {k: sum(r.outcome == k for r in results) for k in order}
    lines = [
        "# Architectures",
        "",
        "Generated by `python -m tests.support.architecture_sweep --out docs/architectures.md`: every entry of",
        "TransformerLens's TransformerBridge registry, built as a tiny random model offline "
        f"(transformers {transformers.__version__}), booted as a bridge and given to `lens_alti.attribute`.",
        "`works` means the result's rows sum to 1 and a padded batch equals each item run alone "
        "(the reconstruction of every block, attention or linear-recurrent mixer, is checked by `attribute` "
        "itself); `refused` names the `LensAltiError` subclass raised and its message.",
        "",
        f"**{len(works)} of {len(tested)} text architectures that transformers builds and the bridge boots and runs "
        f"work**; of the others, {count[REFUSED]} are refused with a specific error, "
        f"{count[BUG]} are bugs and {count[TIMEOUT]} timed out. Not counted: "
        f"{count[TL_FAILS]} that TransformerLens fails to boot or run (or whose padding changes the model's own "
        f"activations), {count[CANNOT_BUILD]} that could not be built as a tiny config, {count['skipped']} skipped "
        "(not text models, or classes this transformers does not have).",
        "",
        "| architecture | outcome | reason |",
        "|---|---|---|",
    ]
    for kind in order:
        for r in results:
            if r.outcome == kind:
                reason = f"{r.reason} {NOTES[r.architecture]}" if r.architecture in NOTES else r.reason
                lines.append(f"| {r.architecture} | {r.outcome} | {reason.replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="architecture names (default: the whole registry)")
    parser.add_argument("--out", help="write the markdown table here")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per architecture")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes at a time")
    args = parser.parse_args(argv)
    if args.worker is not None:
        _worker(args.worker[0], args.worker[1:])
        return 0
    names = args.only or text_architectures()
    results = sweep(names, timeout=args.timeout, jobs=args.jobs)
    table = markdown(results)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in results], f, indent=1)
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
