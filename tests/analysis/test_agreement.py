"""The agreement tasks (subject–verb agreement with attractors, BLiMP-style minimal pairs)."""

from __future__ import annotations

import pytest

from lens_alti.analysis import agreement
from lens_alti.analysis.agreement import AgreementItem, cue_position
from lens_alti.errors import InvalidArgumentError
from tests.support.errors import raises_exactly


def test_sets_are_deterministic_balanced_and_well_formed():
    sva = agreement.subject_verb_agreement()
    assert sva == agreement.subject_verb_agreement() and len(sva) == 48
    assert sva != agreement.subject_verb_agreement(seed=1)
    assert {it.correct for it in sva} == {" is", " are"}
    for it in sva:  # the attractor has the other number: its noun ends the text
        plural_subject = it.correct == " are"
        assert it.cue.endswith("s") == plural_subject and it.text.split()[-1].endswith("s") != plural_subject
    pairs = agreement.minimal_pairs()
    assert len(pairs) == 48 and {it.task for it in pairs} == {"anaphor_gender", "anaphor_number", "determiner_noun"}
    for it in sva + pairs:
        assert it.correct != it.wrong and f"{it.cue}" in it.text.split() or it.text.startswith(it.cue)
    assert len(agreement.subject_verb_agreement(n=None)) == 2 * 8 * 6 * 4


class _WordModel:
    """A stand-in with `to_tokens`: BOS, then one token per word (and per comma)."""

    def to_tokens(self, text: str):
        import torch

        words = text.replace(",", " ,").split()
        return torch.tensor([[0] + [hash(w) % 997 + 1 for w in words]])


def test_cue_position_counts_bos_and_finds_the_first_whole_word():
    model = _WordModel()
    item = AgreementItem("The man who visited the woman hurt", " himself", " herself", "man", "anaphor_gender")
    assert cue_position(model, item) == 2  # BOS, "The", "man": not the "man" of "woman"
    late = AgreementItem("After lunch, Anna washed these dirty", " cars", " car", "these", "determiner_noun")
    assert cue_position(model, late) == 6
    missing = AgreementItem("The keys to the cabinet", " are", " is", "door", "sva")
    raises_exactly(InvalidArgumentError, "item", cue_position, model, missing)


def test_cue_position_refuses_a_tokenisation_that_is_not_a_prefix():
    class Merging(_WordModel):
        def to_tokens(self, text: str):
            import torch

            return torch.tensor([[0, len(text)]])  # the whole text is one token: a prefix never matches

    item = AgreementItem("The keys to the cabinet", " are", " is", "keys", "sva")
    raises_exactly(InvalidArgumentError, "item", cue_position, Merging(), item)
    with pytest.raises(InvalidArgumentError):
        agreement.subject_verb_agreement(n=-1)
