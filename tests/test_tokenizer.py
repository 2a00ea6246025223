import pytest

from icl.text.tokenizer import EOT_ID, SOT_ID, ClipTokenizer

pytestmark = pytest.mark.unit  # pure and fast: no server


def test_matches_clip_reference_ids():
    # Token ids of OpenAI CLIP's own tokenizer for this sentence.
    ids = ClipTokenizer()(["a photo of a cat"])[0]
    assert ids[:7].tolist() == [SOT_ID, 320, 1125, 539, 320, 2368, EOT_ID]
    assert not ids[7:].any()


def test_normalises_case_and_whitespace():
    tok = ClipTokenizer()
    assert (tok(["A  Woman\tin RED"]) == tok(["a woman in red"])).all()


def test_truncation_keeps_end_of_text_in_the_last_slot():
    tok = ClipTokenizer(context_length=16)
    ids = tok(["word " * 100])[0]
    assert ids.shape == (16,)
    assert ids[0] == SOT_ID and ids[-1] == EOT_ID
    assert (ids[1:-1] != 0).all()


def test_round_trip_and_empty_text():
    tok = ClipTokenizer()
    assert tok.decode(tok(["carrying a black backpack."])[0]) == "carrying a black backpack ."
    empty = tok([""])[0]
    assert empty[:2].tolist() == [SOT_ID, EOT_ID] and not empty[2:].any()
