"""The engine's text path is incremental (issue 16 item 10), and gives exactly what the former
whole-output path gave: the text of every prefix of an output equals a full decode of it, for
the byte tokenizer and for a byte-level BPE ``tokenizer.json``; stop strings are found where a
search of the whole text finds them; the held-back tail is what trying every prefix length
gives. Speed is measured by bench/serving_text.py, not here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubeforge_runtime.serve.detokenize import Detokenizer, find_stop, stable_length
from kubeforge_runtime.tokenizer import ByteTokenizer, HFTokenizer

pytestmark = pytest.mark.runtime

CORPUS = "Ünïcödé, 漢字 and emoji 🙂 split across tokens; plain ASCII words too. " * 20


def _bench_module() -> ModuleType:
    """bench/serving_text.py: its ``before`` path (the engine's former code) is the reference."""
    spec = importlib.util.spec_from_file_location("serving_text", Path(__file__).parents[2] / "bench" / "serving_text.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_old_stable_length = _bench_module()._old_stable_length


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator([CORPUS], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = tmp_path_factory.mktemp("bpe")
    t.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return HFTokenizer(d)


def _check_prefixes(tok: ByteTokenizer | HFTokenizer, ids: list[int]) -> None:
    det = Detokenizer(tok)
    for n, t in enumerate(ids, 1):
        det.add(t, final=n == len(ids))
        full = tok.decode(ids[:n])
        if n == len(ids):
            assert det.text == full, (ids, det.text, full)
        else:  # mid-stream text ending in an incomplete character waits; what is there is a prefix
            assert full.startswith(det.text), (ids[:n], det.text)
            if not full.endswith("\ufffd"):
                assert det.text == full, (ids[:n], det.text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 258), max_size=60))
def test_byte_tokenizer_increments_equal_the_full_decode(ids: list[int]) -> None:
    _check_prefixes(ByteTokenizer(), ids)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_bpe_increments_equal_the_full_decode(bpe: HFTokenizer, data: st.DataObject) -> None:
    vocab = bpe._tok.get_vocab_size()
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=40))
    _check_prefixes(bpe, ids)


def test_real_text_comes_back_whole(bpe: HFTokenizer) -> None:
    for tok in (ByteTokenizer(), bpe):
        ids = tok.encode(CORPUS[:400])
        det = Detokenizer(tok)
        pieces = [det.add(t, final=i == len(ids) - 1) for i, t in enumerate(ids)]
        assert "".join(pieces) == det.text == CORPUS[:400]
        assert "\ufffd" not in "".join(pieces)  # a split character is never streamed half


@settings(max_examples=500, deadline=None)
@given(pieces=st.lists(st.text("ab\ufffdc", max_size=5), max_size=12),
       stops=st.lists(st.text("abc", min_size=1, max_size=9), max_size=4))
def test_stops_found_incrementally_where_a_full_search_finds_them(pieces: list[str], stops: list[str]) -> None:
    text, found = "", -1
    for piece in pieces:
        searched = len(text)
        text += piece
        found = find_stop(text, stops, searched)
        if found >= 0:
            break
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    assert found == (min(hits) if hits else -1), (text, stops)


@settings(max_examples=1000, deadline=None)
@given(text=st.text("abc\ufffd", max_size=40), stops=st.lists(st.text("abc", min_size=1, max_size=30), max_size=5))
def test_the_held_back_tail_is_the_longest_prefix_of_a_stop(text: str, stops: list[str]) -> None:
    assert stable_length(text, tuple(stops)) == _old_stable_length(text, tuple(stops))


def test_a_long_repetitive_stop_is_handled_in_full() -> None:
    stop = "a" * 255 + "b"
    assert stable_length("x" + "a" * 300, (stop,)) == 301 - 255
    assert find_stop("x" + "a" * 300 + "b", (stop,), 300) == 301 - 255
