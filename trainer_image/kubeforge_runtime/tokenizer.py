"""Tokenizers for training and serving: a self-contained byte-level one by default, or a
Hugging Face ``tokenizer.json`` through the ``tokenizers`` package when one is provided.

Why a byte-level default: a pod must be able to train and serve with nothing downloaded,
and 256 byte ids plus three specials cover every input. ``ByteTokenizer.save`` writes the
same mapping as a ``tokenizer.json`` (GPT-2 style ``ByteLevel`` pre-tokenizer over a BPE
model with no merges), so an export loads in transformers' ``AutoTokenizer`` and in
``load_tokenizer`` with identical ids.

Both classes share one interface (the ``Tokenizer`` protocol): ``encode``, ``decode``,
``bos_id``, ``eos_id``, ``pad_id``, ``vocab_size``, ``save``. ``encode`` never adds specials by
itself (callers decide where documents start and end), but it does turn the literal special
token strings (``<s>``, ``</s>``, ``<pad>`` for the byte tokenizer) into their ids, because
that is what ``tokenizers`` does with added tokens and what a rendered chat template needs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"

#: One turn per message, each ended by the eos token; a generation prompt opens the
#: assistant turn so the model's eos closes it and stops generation.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"


@runtime_checkable
class Tokenizer(Protocol):
    """What the trainer and the serving engine need from a tokenizer."""

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, directory: str | Path) -> list[Path]: ...


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map, as ``tokenizers.pre_tokenizers.ByteLevel``
    uses it. Reproduced here so the byte tokenizer needs no package at all."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes of the text; 256, 257, 258 are bos, eos and pad."""

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    _specials = {BOS_TOKEN: 256, EOS_TOKEN: 257, PAD_TOKEN: 258}
    _special_re = re.compile("(" + "|".join(re.escape(s) for s in _specials) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, piece in enumerate(self._special_re.split(text)):
            if i % 2:  # odd pieces are the captured special token strings
                ids.append(self._specials[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; specials are dropped and an incomplete UTF-8 sequence becomes
        U+FFFD (a streaming caller should hold back such a tail itself)."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def tokenizer_json(self) -> dict[str, Any]:
        """The ``tokenizer.json`` document equivalent to this tokenizer."""
        b2u = bytes_to_unicode()
        vocab = {b2u[b]: b for b in range(256)}
        added = [
            {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for s, i in self._specials.items()
        ]
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                              "use_regex": False},
            # like Llama: the Hugging Face tokenizer prepends bos when asked for specials
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {BOS_TOKEN: {"id": BOS_TOKEN, "ids": [self.bos_id], "tokens": [BOS_TOKEN]}},
            },
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                        "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab, "merges": []},
        }

    def save(self, directory: str | Path) -> list[Path]:
        """Write tokenizer.json, tokenizer_config.json (with the chat template) and
        special_tokens_map.json; returns the files written."""
        import tokenizers  # validate the document with the real parser before writing it

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        doc = json.dumps(self.tokenizer_json(), ensure_ascii=False)
        tokenizers.Tokenizer.from_str(doc).save(str(d / TOKENIZER_FILE))
        return [d / TOKENIZER_FILE, *_write_tokenizer_config(d, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)]


def _write_tokenizer_config(d: Path, bos: str, eos: str, pad: str | None) -> list[Path]:
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
        "chat_template": CHAT_TEMPLATE,
    }
    (d / TOKENIZER_CONFIG_FILE).write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    smap = {"bos_token": bos, "eos_token": eos, **({"pad_token": pad} if pad else {})}
    (d / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(smap, indent=2, ensure_ascii=False))
    return [d / TOKENIZER_CONFIG_FILE, d / SPECIAL_TOKENS_MAP_FILE]


# Names under which common tokenizers spell their specials, tried in order when
# tokenizer_config.json does not say.
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>", "<bos>")
_EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|eot_id|>", "<|endoftext|>", "<|im_end|>", "<eos>")
_PAD_CANDIDATES = ("<pad>", "<|finetune_right_pad_id|>", "<|pad|>", "[PAD]")


class HFTokenizer:
    """A ``tokenizer.json`` loaded through the ``tokenizers`` package."""

    def __init__(self, directory: str | Path) -> None:
        import tokenizers

        self.directory = Path(directory)
        self._tok = tokenizers.Tokenizer.from_file(str(self.directory / TOKENIZER_FILE))
        cfg_path = self.directory / TOKENIZER_CONFIG_FILE
        self._config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self._bos = self._special("bos_token", _BOS_CANDIDATES)
        self._eos = self._special("eos_token", _EOS_CANDIDATES)
        pad = self._special("pad_token", _PAD_CANDIDATES, required=False)
        self._pad = self._eos if pad is None else pad

    def _special(self, key: str, candidates: Sequence[str], required: bool = True) -> int | None:
        value = self._config.get(key)
        if isinstance(value, dict):  # older configs store an AddedToken dict
            value = value.get("content")
        for name in ([value] if isinstance(value, str) else []) + list(candidates):
            tid = self._tok.token_to_id(name)
            if tid is not None:
                return int(tid)
        if required:
            raise ValueError(f"{self.directory / TOKENIZER_FILE}: no {key} found "
                             f"(set {key} in {TOKENIZER_CONFIG_FILE})")
        return None

    @property
    def bos_id(self) -> int:
        assert self._bos is not None
        return self._bos

    @property
    def eos_id(self) -> int:
        assert self._eos is not None
        return self._eos

    @property
    def pad_id(self) -> int:
        assert self._pad is not None
        return self._pad

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def chat_template(self) -> str | None:
        tpl = self._config.get("chat_template")
        if isinstance(tpl, str):
            return tpl
        jinja = self.directory / "chat_template.jinja"
        return jinja.read_text() if jinja.exists() else None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode([int(i) for i in ids], skip_special_tokens=True))

    def save(self, directory: str | Path) -> list[Path]:
        """Copy the tokenizer files into ``directory`` (an export carries its tokenizer)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        written = []
        for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, "chat_template.jinja"):
            src = self.directory / name
            if src.exists() and src.resolve() != (d / name).resolve():
                (d / name).write_bytes(src.read_bytes())
                written.append(d / name)
        return written


def load_tokenizer(directory: str | Path | None) -> ByteTokenizer | HFTokenizer:
    """The tokenizer in ``directory`` (a folder holding ``tokenizer.json``, or that file
    itself) when there is one, else the byte tokenizer (``None`` or a folder without one)."""
    if directory is None:
        return ByteTokenizer()
    p = Path(directory)
    if not p.exists():
        # a mistyped path must not silently train with a different vocabulary
        raise FileNotFoundError(f"tokenizer path {p} does not exist")
    if p.name == TOKENIZER_FILE and p.is_file():
        p = p.parent
    if (p / TOKENIZER_FILE).is_file():
        return HFTokenizer(p)
    return ByteTokenizer()
