"""Supervised fine-tuning data: prompt + target records (what curation writes), one sample each,
with a loss mask over the target.

A record is ``{"prompt": text or null, "messages": [{role, content}] or null, "target": text}``
(other fields are ignored), a ``.json`` member of a tar (WebDataset) or a JSONL line. Its sample
is the prompt as the server would see it, then the target, then eos::

    bos + prompt ids + target ids + eos, padded with pad to seq_len + 1

A chat prompt is rendered with the tokenizer's chat template and ``add_generation_prompt``,
exactly as ``serve/api.py`` renders a chat request, and a text prompt is encoded as the server
encodes one; bos is not doubled when the rendered template begins with it. A sample longer than
seq_len + 1 keeps the start of its target: the prompt is cut from the left (bos stays first),
but to no less than half the window, and the target is cut at its end only when it needs more
than the rest (a long target with a long prompt: half each).

The loss counts only the target's tokens and its eos (``loss_mask[j]`` is 1 where the input at
``j`` predicts a target token), so the model learns to answer, not to echo prompts.

Resuming: one record is one sample, so the position is (epoch, file, record): ``DataState.piece``
is the index of the next record in the file and ``offset`` is always 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubeforge_runtime.data.sources import SourceFile, open_binary
from kubeforge_runtime.tokenizer import BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKEN, ByteTokenizer, HFTokenizer


@dataclasses.dataclass(frozen=True)
class SFTRecord:
    """The fields of an SFT record a sample is made of."""

    prompt: str | None
    messages: list[dict[str, str]] | None
    target: str

    @classmethod
    def parse(cls, obj: Any, where: str, target_field: str = "target") -> SFTRecord:
        """``target_field`` names the target (a golden set's records call it ``reference``)."""
        if not isinstance(obj, dict) or not isinstance(obj.get(target_field), str):
            raise ValueError(f"{where}: an SFT record needs a string field '{target_field}'")
        prompt, messages = obj.get("prompt"), obj.get("messages")
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"{where}: 'prompt' must be a string or null")
        if messages is not None:
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise ValueError(f"{where}: 'messages' must be a list of {{role, content}} strings")
        if (prompt is None) == (messages is None):
            raise ValueError(f"{where}: exactly one of 'prompt' and 'messages' must be set")
        return cls(prompt, messages, obj[target_field])


@dataclasses.dataclass(frozen=True)
class SFTSample:
    """``tokens`` (seq_len + 1 ids); ``loss_mask`` (seq_len) is 1 where ``tokens[j + 1]`` is a
    target token the loss counts."""

    tokens: list[int]
    loss_mask: list[int]


def _raw_records(src: SourceFile) -> Iterator[tuple[str, bytes]]:
    """(where, JSON bytes) of each record of one file, in file order."""
    with open_binary(src.uri) as stream:
        if src.uri.endswith(".tar"):
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if member.isfile() and os.path.basename(member.name).partition(".")[2].lower() == "json":
                        f = tar.extractfile(member)
                        assert f is not None
                        yield f"{src.uri}:{member.name}", f.read()
        else:
            for n, line in enumerate(stream, 1):
                if line.strip():
                    yield f"{src.uri}:{n}", line


def read_records(src: SourceFile, start: int = 0, target_field: str = "target") -> Iterator[tuple[int, SFTRecord]]:
    """(index, record) of one file from record ``start`` on; records before it are skipped
    without being decoded."""
    for i, (where, raw) in enumerate(_raw_records(src)):
        if i >= start:
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{where}: not JSON: {e}") from None
            yield i, SFTRecord.parse(obj, where, target_field)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class PromptEncoder:
    """Prompt ids as the server makes them: the chat template for messages (the tokenizer's own,
    else ``CHAT_TEMPLATE``), ``encode`` for text."""

    def __init__(self, tokenizer: ByteTokenizer | HFTokenizer) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.tok = tokenizer
        source = tokenizer.chat_template if isinstance(tokenizer, HFTokenizer) else None
        bos, eos = BOS_TOKEN, EOS_TOKEN
        if isinstance(tokenizer, HFTokenizer):
            cfg_path = Path(tokenizer.directory) / "tokenizer_config.json"
            cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
            bos = _token_text(cfg.get("bos_token")) or bos
            eos = _token_text(cfg.get("eos_token")) or eos

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(source or CHAT_TEMPLATE)
        self.bos, self.eos = bos, eos
        self.specials = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}

    def text(self, rec: SFTRecord) -> str:
        """The prompt as text: itself, or the messages through the template."""
        if rec.prompt is not None:
            return rec.prompt
        return str(self.template.render(messages=rec.messages, bos_token=self.bos, eos_token=self.eos,
                                        add_generation_prompt=True))

    def ids(self, rec: SFTRecord) -> list[int]:
        return self.tok.encode(self.text(rec))

    def profile_ids(self, rec: SFTRecord) -> list[int]:
        """What a prompt profile counts, as the server's live profile does: the prompt's ids, or
        for a chat its messages' contents one per line (no template), without special tokens."""
        if rec.messages is not None:
            text = "\n".join(m["content"] for m in rec.messages)
            return [t for t in self.tok.encode(text) if t not in self.specials]
        return [t for t in self.ids(rec) if t not in self.specials]


def build_sample(prompt: list[int], target: list[int], *, bos: int, eos: int, pad: int,
                 sample_len: int) -> SFTSample:
    """bos + prompt + target + eos cut or padded to ``sample_len`` (seq_len + 1), and its mask."""
    if prompt[:1] == [bos]:
        prompt = prompt[1:]
    answer = [*target, eos]
    room = sample_len - 1  # after bos
    if len(prompt) + len(answer) > room:
        # the target's start matters most: the prompt gives way first, from the left, but keeps
        # half the window when the target alone would fill it
        keep = max(room - len(answer), min(len(prompt), room // 2))
        prompt = prompt[len(prompt) - keep:] if keep else []
        answer = answer[:room - len(prompt)]
    tokens = [bos, *prompt, *answer]
    start = 1 + len(prompt)  # index in tokens of the first target token
    mask = [1 if j + 1 >= start else 0 for j in range(len(tokens) - 1)]
    pad_n = sample_len - len(tokens)
    return SFTSample(tokens + [pad] * pad_n, mask + [0] * pad_n)


def first_record(files: list[SourceFile]) -> SFTRecord | None:
    """The first record of the first file that has one (a check before training starts)."""
    for src in files:
        for _, rec in read_records(src):
            return rec
    return None
