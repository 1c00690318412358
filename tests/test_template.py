"""TemplateEncoder tokenizes items through the fast tokenizer's backend directly (template.py): the
same ids as the tokenizer's own call, and the call itself whenever another user of the tokenizer
has left its backend in another state (truncating, padding, splitting special tokens)."""

import pytest

from darl_infer.template import Template, TemplateEncoder
from tiny_models import WORDS, tiny_tokenizer

TEXTS = [
    "w1 w2 w3", "  w4\tw5\n", "w6 <eos> w7", "<pad><bos>", "w8, w9! - 12.5?", "unknown words here", "w10 ünïcödé 中文",
    " ".join(WORDS[:150]),  # past the template's 128-token item limit
]


def expected_suffixes(encoder: TemplateEncoder, tokenizer, texts: list[str]) -> list[list[int]]:
    limit = encoder.template.max_item_tokens
    return [ids[:limit] + encoder.answer_cue for ids in tokenizer(texts, add_special_tokens=False).input_ids]


def test_items_through_the_backend_are_the_tokenizers_ids():
    tokenizer = tiny_tokenizer()
    encoder = TemplateEncoder(Template(), tokenizer)
    assert encoder.backend is not None  # the direct path is the one under test
    got = encoder.encode("w1 w2", TEXTS)
    assert got.suffixes == expected_suffixes(encoder, tokenizer, TEXTS)
    assert got.truncated == [False] * 7 + [True]


@pytest.mark.parametrize("left_by_another_caller", [
    dict(truncation=True, max_length=2), dict(padding="max_length", max_length=40), dict(split_special_tokens=True),
])
def test_a_backend_left_in_another_state_is_not_used(left_by_another_caller):
    tokenizer = tiny_tokenizer()
    encoder = TemplateEncoder(Template(), tokenizer)
    tokenizer(TEXTS, add_special_tokens=False, **left_by_another_caller)  # another user of the tokenizer
    got, _ = encoder.item_suffixes(TEXTS)  # items alone (encode's query call would reset the backend first)
    assert got == expected_suffixes(encoder, tokenizer, TEXTS)
    assert encoder.item_suffixes(TEXTS)[0] == got  # that call reset the backend: direct again, same ids
