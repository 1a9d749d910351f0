"""ALTI and ALTI+ as inseq attribution methods: ``"alti"`` and ``"alti_plus"``.

    import inseq
    import lens_alti.interop.inseq  # registers the methods with inseq (idempotent)

    model = inseq.load_model(hf_model_or_name, "alti_plus")      # encoder-decoders
    out = model.attribute("The cat sat.", "Le chat était assis.")
    out.show(); out.aggregate(); out.save("alti.json")

The scores are computed by lens_alti, not by inseq: the inseq model's Hugging Face model is
booted once as a TransformerLens ``TransformerBridge`` (on a copy, so inseq's own model is left
untouched) and each batch is attributed from one forward pass (``is_final_step_method``: the
whole generated sequence is explained at once, then split into inseq's per-step outputs).

What the scores are, for the step that generates target token ``t``:
- decoder-only (``"alti"``): the ALTI rollout row of the position that predicts ``t``
  (``AltiResult.rollout[:, -1, t - 1, :t]``), over the prompt and the generated prefix;
- encoder-decoder (``"alti_plus"``): the ALTI+ ``total`` row of that position
  (``Seq2SeqAltiResult.total[:, -1, t - 1]``): source tokens in ``source_attributions`` and
  target-prefix tokens in ``target_attributions`` (with ``attribute_target=True``; otherwise the
  target side is dropped, as inseq does for every method). Each row sums to 1 over both sides.

Step functions (``step_scores=["probability"]``, ...) need inseq's step-by-step loop: load the
method with ``stepwise=True`` (``model.attribute(..., method="alti", stepwise=True)`` or
``inseq.load_model(..., "alti", stepwise=True)``); it runs one forward pass per generated token,
with the same numbers. Both methods refuse the other family with a clear error. ``measure`` ("l1" default, "l2",
"koba") can be passed as ``model.attribute(..., measure="l2")``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from lens_alti.errors import LensAltiError, UnsupportedModelError

try:
    from inseq.attr.feat.internals_attribution import InternalsAttributionRegistry
    from inseq.data import CoarseFeatureAttributionStepOutput as FeatureAttributionStepOutput
    from inseq.utils.typing import InseqAttribution
except ImportError as exc:  # pragma: no cover - depends on the optional dependency
    raise ImportError(
        "lens_alti.interop.inseq needs inseq: pip install 'lens-alti[inseq]' "
        "(see the README for the install line that avoids inseq's CUDA-only pins)"
    ) from exc

_BRIDGE_ATTR = "_lens_alti_bridge"


def _bridge(attribution_model: Any) -> Any:
    """The TransformerBridge around the inseq model's Hugging Face model, booted once and kept."""
    bridge = getattr(attribution_model, _BRIDGE_ATTR, None)
    if bridge is not None:
        return bridge
    from transformer_lens.model_bridge import TransformerBridge

    hf = attribution_model.model
    name = str(getattr(hf.config, "name_or_path", "") or type(hf).__name__)
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=copy.deepcopy(hf), tokenizer=attribution_model.tokenizer, device=str(attribution_model.device)
    )
    setattr(attribution_model, _BRIDGE_ATTR, bridge)
    return bridge


def _ids_and_masks(inputs: tuple[Tensor, ...], extra: tuple[Any, ...], encoder_decoder: bool) -> dict[str, Tensor]:
    """Token ids and masks from inseq's ``additional_forward_args`` (its formatters' fixed order)."""
    if not encoder_decoder:  # (ids, step target ids, attributed fn, mask, ...)
        return {"ids": extra[0], "mask": extra[3]}
    offset = 0 if len(inputs) > 1 else 1  # without attribute_target, the target embeddings come first
    return {
        "source": extra[offset],
        "target": extra[offset + 1],
        "source_mask": extra[offset + 4],
        "target_mask": extra[offset + 5],
    }


def _last_real(rows: Tensor, mask: Tensor) -> Tensor:
    """`rows[b, q, :]` at each item's last real (mask = 1) query position: `[batch, key]`."""
    pos = torch.arange(mask.shape[1], device=mask.device)
    last = (pos * (mask > 0)).argmax(dim=1)
    return rows[torch.arange(rows.shape[0], device=rows.device), last]


class _LensAlti(InseqAttribution):
    """The computation behind both methods: one forward pass of the bridge, then lens_alti."""

    def __init__(self, attribution_model: Any, family: str) -> None:
        super().__init__(attribution_model)
        self.attribution_model = attribution_model
        self.family = family
        self.final_step = True  # False: called once per generation step, explain only its last position

    @staticmethod
    def has_convergence_delta() -> bool:
        return False

    @torch.no_grad()
    def attribute(
        self,
        inputs: tuple[Tensor, ...],
        additional_forward_args: tuple[Any, ...],
        measure: str = "l1",
    ) -> FeatureAttributionStepOutput:
        import lens_alti

        model = self.attribution_model
        if model.is_encoder_decoder != (self.family == "encoder_decoder"):
            want = "'alti_plus'" if model.is_encoder_decoder else "'alti'"
            raise UnsupportedModelError(
                f"{model.model_name} is {'an encoder-decoder' if model.is_encoder_decoder else 'decoder-only'}: "
                f"use inseq.load_model(..., {want})"
            )
        if measure not in ("l1", "l2", "koba"):
            raise LensAltiError(f"measure must be 'l1', 'l2' or 'koba' for inseq, got {measure!r}")
        bridge = _bridge(model)
        args = _ids_and_masks(inputs, additional_forward_args, model.is_encoder_decoder)
        device = next(bridge.parameters()).device
        args = {k: v.to(device) for k, v in args.items()}
        if not model.is_encoder_decoder:
            _, cache = bridge.run_with_cache(args["ids"], attention_mask=args["mask"])
            res = lens_alti.attribute(cache, attention_mask=args["mask"], measure=measure)
            assert isinstance(res, lens_alti.AltiResult)  # a decoder-only model's cache
            rows = res.rollout[:, -1]  # [batch, query, key]
            if not self.final_step:  # this step's prediction: each item's last real position
                last = _last_real(rows, args["mask"])
                return FeatureAttributionStepOutput(source_attributions=None, target_attributions=last.cpu())
            return FeatureAttributionStepOutput(
                source_attributions=None, target_attributions=rows.transpose(1, 2).cpu()
            )
        _, cache = bridge.run_with_cache(
            args["source"],
            decoder_input=args["target"],
            attention_mask=args["source_mask"],
            decoder_attention_mask=args["target_mask"],
        )
        res = lens_alti.attribute(
            cache,
            attention_mask=args["source_mask"],
            decoder_attention_mask=args["target_mask"],
            decoder_tokens=args["target"],  # the real target ids: never mistaken for a forgotten target
            measure=measure,
        )
        assert isinstance(res, lens_alti.Seq2SeqAltiResult)
        s = args["source"].shape[1]
        total = res.total[:, -1]  # [batch, tgt, src + tgt]
        if not self.final_step:  # this step's prediction: each item's last real target position
            row = _last_real(total, args["target_mask"])
            target_row = row[:, s:].cpu() if len(inputs) > 1 else None
            return FeatureAttributionStepOutput(source_attributions=row[:, :s].cpu(), target_attributions=target_row)
        source = total[..., :s].transpose(1, 2).cpu()  # inseq's layout: [batch, key, query]
        target = total[..., s:].transpose(1, 2).cpu() if len(inputs) > 1 else None
        return FeatureAttributionStepOutput(source_attributions=source, target_attributions=target)


class AltiAttribution(InternalsAttributionRegistry):
    """ALTI rollout (Ferrando et al. 2022) for decoder-only models, computed by lens_alti."""

    method_name = "alti"
    family = "decoder"

    def __init__(self, attribution_model: Any, stepwise: bool = False, **kwargs: Any) -> None:
        super().__init__(attribution_model)
        self.use_predicted_target = False  # explains the given (or generated) sequence, any decoding
        # Default: one forward pass explains every generation step. stepwise=True runs one pass per
        # step instead (slower), which inseq needs for step functions (step_scores=[...]).
        self.is_final_step_method = not stepwise
        self.method = _LensAlti(attribution_model, self.family)
        self.method.final_step = not stepwise

    def attribute_step(
        self, attribute_fn_main_args: dict[str, Any], attribution_args: dict[str, Any] | None = None
    ) -> FeatureAttributionStepOutput:
        return self.method.attribute(**attribute_fn_main_args, **(attribution_args or {}))


class AltiPlusAttribution(AltiAttribution):
    """ALTI+ (Ferrando et al. 2022, "Towards Opening the Black Box of NMT") for encoder-decoders."""

    method_name = "alti_plus"
    family = "encoder_decoder"


def register() -> list[str]:
    """Make sure ``"alti"`` and ``"alti_plus"`` are known to inseq (importing this module does it)."""
    import inseq

    names = inseq.list_feature_attribution_methods()
    missing = [m for m in ("alti", "alti_plus") if m not in names]
    if missing:  # pragma: no cover - subclass registration is inseq's mechanism
        raise LensAltiError(f"inseq did not register {missing}; inseq's Registry API may have changed")
    return ["alti", "alti_plus"]
