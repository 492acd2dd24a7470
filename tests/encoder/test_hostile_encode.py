"""``encode`` on hostile strings (property-based): never crashes, stays finite and unit-norm, is
padding-invariant, reports truncation, and names the index of an item it cannot take."""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matryoshka2d import MatryoshkaEncoder
from tests.conftest import WORDS, write_vocab

LAYERS, HIDDEN, MAX_TOKENS = 4, 32, 128

CONTROL = "".join(map(chr, [*range(0, 32), 127, *range(0x80, 0xA0)]))  # NUL included
ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff\u00ad"
COMBINING = "\u0300\u0301\u0308\u0327\u036f\u20dd\u0489"
RTL = "\u05d0\u05e9\u05dc\u05d5\u05dd\u0627\u0644\u0639\u0631\u0628\u064a\u0629\u200f\u202b\u202e\u2067"
WHITESPACE = " \t\n\r\x0b\x0c\u00a0\u1680\u2028\u2029\u3000"
EMOJI = ["😀", "👩\u200d👩\u200d👧\u200d👦", "🇫🇷", "👍🏽", "❤\ufe0f", "🧑\u200d🚀", "a\u0301"]

_piece = st.one_of(
    st.text(max_size=40),  # any code point except lone surrogates
    st.text(alphabet=st.sampled_from(CONTROL + ZERO_WIDTH + COMBINING + RTL + WHITESPACE), max_size=40),
    st.lists(st.sampled_from([*WORDS, *EMOJI, "Ünïcödé", "x" * 50]), max_size=15).map(" ".join),
)


def _long(base: str, words: int) -> str:
    """About 10k characters: a hostile piece repeated, with real words so that it overflows 128 tokens."""
    unit = f"{base} {' '.join(WORDS[:words])} "
    return (unit * (10_000 // len(unit) + 1))[:10_000]


hostile_text = st.one_of(
    st.just(""),
    st.text(alphabet=WHITESPACE, min_size=1, max_size=20),  # whitespace only
    _piece,
    st.lists(_piece, min_size=2, max_size=4).map("".join),  # mixtures
    st.builds(_long, _piece, st.integers(0, 5)),  # very long
)
hostile_lists = st.lists(hostile_text, min_size=1, max_size=5)

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MatryoshkaEncoder]:
    """A tiny random BERT (4 layers, hidden 32) with a real word-piece vocabulary (words, ASCII, ##pieces).

    Runs on one thread: for a model this small, a second intra-op thread only adds synchronisation, which
    on a busy machine makes each call ~50x slower.
    """
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("hostile")
    tokenizer = BertTokenizer(vocab=str(write_vocab(folder)), do_lower_case=True, model_max_length=MAX_TOKENS)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                        num_attention_heads=4, intermediate_size=2 * HIDDEN,
                        max_position_embeddings=MAX_TOKENS + 2)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    encoder = MatryoshkaEncoder.from_pretrained(folder, pooling="mean").eval()
    assert len(encoder.tokenizer) > 100 and encoder.max_seq_length == MAX_TOKENS
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield encoder
    torch.set_num_threads(threads)


@contextlib.contextmanager
def _warnings_of(name: str) -> Iterator[list[str]]:
    """Collect WARNING messages of logger ``name`` (caplog is function-scoped: hypothesis cannot reset it)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger(name)
    log.addHandler(handler)
    try:
        yield messages
    finally:
        log.removeHandler(handler)


# ----------------------------------------------------------------------------------- properties
@settings(max_examples=150, **SETTINGS)
@given(texts=hostile_lists, batch_size=st.integers(1, 5), layer=st.integers(1, LAYERS),
       dim=st.integers(1, HIDDEN))
def test_encode_never_crashes_and_is_finite_unit_norm_and_padding_invariant(model, texts, batch_size, layer,
                                                                             dim):
    out = model.encode(texts, layer=layer, dim=dim, batch_size=batch_size)
    assert out.shape == (len(texts), dim) and out.dtype == np.float32
    assert np.isfinite(out).all()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    alone = np.stack([model.encode(t, layer=layer, dim=dim) for t in texts])  # no padding at all
    np.testing.assert_allclose(out, alone, atol=1e-5)


@settings(max_examples=60, **SETTINGS)
@given(texts=hostile_lists)
def test_truncation_is_reported_with_its_count(model, texts):
    lengths = [len(model.tokenizer(t)["input_ids"]) for t in texts]
    expected = sum(n > model.max_seq_length for n in lengths)
    with _warnings_of("matryoshka2d.encoder.batching") as messages:
        out = model.encode(texts, batch_size=2)
    assert np.isfinite(out).all()
    reports = [m for m in messages if "truncated" in m]
    if expected == 0:
        assert reports == []
    else:
        assert len(reports) == 1
        counted = re.search(r"(\d+) of (\d+) texts were longer than max_seq_length=(\d+)", reports[0])
        assert counted is not None, reports[0]
        assert counted.groups() == (str(expected), str(len(texts)), str(model.max_seq_length))


def test_a_long_text_embeds_as_its_first_max_seq_length_tokens(model):
    text = _long("Ünïcödé 😀", 5)
    ids = model.tokenizer(text, truncation=True, max_length=model.max_seq_length)["input_ids"]
    head = model.tokenizer.decode(ids[1:-1])  # the kept word pieces, re-joined
    assert len(model.tokenizer(head)["input_ids"]) == model.max_seq_length
    np.testing.assert_allclose(model.encode(text), model.encode(head), atol=1e-5)


_NOT_STRINGS = [None, 1, 1.5, math.nan, b"bytes", bytearray(b"x"), ["a list"], ("a", "tuple"), {"a": 1},
                np.float32(1.0), True, Path("a/path")]


@settings(max_examples=100, **SETTINGS)
@given(texts=st.lists(hostile_text, max_size=5), bad=st.sampled_from(_NOT_STRINGS), data=st.data())
def test_a_non_string_item_is_a_value_error_naming_its_index(model, texts, bad, data):
    index = data.draw(st.integers(0, len(texts)), label="index")
    texts.insert(index, bad)
    with pytest.raises(ValueError, match=rf"^texts\[{index}\] is {type(bad).__name__} .*not str"):
        model.encode(texts)


@settings(max_examples=50, **SETTINGS)
@given(texts=st.lists(st.text(max_size=10), min_size=1, max_size=5),
       surrogate=st.integers(0xD800, 0xDFFF).map(chr), data=st.data())
def test_a_lone_surrogate_is_a_value_error_naming_its_index(model, texts, surrogate, data):
    index = data.draw(st.integers(0, len(texts) - 1), label="index")
    position = data.draw(st.integers(0, len(texts[index])), label="position")
    texts[index] = texts[index][:position] + surrogate + texts[index][position:]
    message = rf"^texts\[{index}\] holds .* at position {position}, a lone surrogate"
    with pytest.raises(ValueError, match=message):
        model.encode(texts)


@pytest.mark.parametrize(("texts", "message"), [
    ([], "texts is empty"),
    ((t for t in ["a"]), "texts must be a list of strings, got generator"),
    (b"bytes", "texts must be a list of strings, got bytes"),
    (None, "texts must be a list of strings, got NoneType"),
])
def test_input_that_is_not_a_list_of_strings_is_refused(model, texts, message):
    with pytest.raises(ValueError, match=message):
        model.encode(texts)


def test_a_single_string_gives_one_vector_equal_to_its_batch_row(model):
    text = "\x00\u200b 😀 a man\u202e plays\u0301 guitar \u3000"
    one = model.encode(text, layer=2, dim=16)
    assert one.shape == (16,)
    np.testing.assert_allclose(one, model.encode([text, "", "cat"], layer=2, dim=16)[0], atol=1e-5)
