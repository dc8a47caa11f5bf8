"""The byte tokenizer and its Hugging Face twin give the same ids; transformers loads it."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubeforge_runtime.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

pytestmark = pytest.mark.runtime

TEXTS = ["", "hello world", "héllo wörld ✓ 日本語 🙂", "  leading spaces\n\ttabs", "a<s>b</s>c<pad>",
         "Ġ and Ċ are not bytes"]


def test_byte_tokenizer_round_trips_and_maps_specials() -> None:
    tok = ByteTokenizer()
    assert tok.vocab_size == 259 and (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
    assert tok.encode("hi") == [104, 105]
    assert tok.encode("a</s>b") == [97, 257, 98]
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        specials_free = text.replace("<s>", "").replace("</s>", "").replace("<pad>", "")
        assert tok.decode(ids) == specials_free


def test_saved_tokenizer_json_matches_byte_tokenizer(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    files = tok.save(tmp_path)
    assert {f.name for f in files} >= {"tokenizer.json", "tokenizer_config.json"}
    hf = load_tokenizer(tmp_path)
    assert isinstance(hf, HFTokenizer)
    assert (hf.bos_id, hf.eos_id, hf.pad_id, hf.vocab_size) == (256, 257, 258, 259)
    for text in TEXTS:
        assert hf.encode(text) == tok.encode(text), text
        assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert hf.chat_template and "eos_token" in hf.chat_template


def test_transformers_loads_saved_tokenizer_and_chat_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    ByteTokenizer().save(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf("hé")["input_ids"] == [256, 104, 195, 169]  # bos prepended, like Llama
    assert hf.eos_token_id == 257 and hf.pad_token_id == 258
    ids = hf.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    assert list(ids) == [256, *b"user: hi", 257, *b"\nassistant: "]


def test_load_tokenizer_defaults(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)  # folder without tokenizer.json
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
