"""The baseline prompt profile an export carries (``flywheel.BASELINE_PROFILE_NAME``): the
histograms the operator compares served prompts against (drift, PSI).

It counts the first ``BASELINE_PROMPTS`` prompts of the training data in the order of the
first epoch: for SFT data each record's prompt (a chat: its messages' contents, one per line,
without the template, as the server's live profile counts a chat); for text data each
non-empty line. Token ids are counted without special
tokens, as the server's live profile counts them.
"""

from __future__ import annotations

from collections.abc import Iterator

from kubeforge.store.flywheel import Profile
from kubeforge.store.layout import utc_now

from kubeforge_runtime.data.loader import file_order
from kubeforge_runtime.data.sft import PromptEncoder, read_records
from kubeforge_runtime.data.sources import SourceFile, read_pieces
from kubeforge_runtime.tokenizer import ByteTokenizer, HFTokenizer

BASELINE_PROMPTS = 5000


def _lines(files: list[SourceFile], order: list[int], text_field: str) -> Iterator[str]:
    for i in order:
        tail = ""  # a line may span two pieces of a large text file
        for piece in read_pieces(files[i], text_field):
            lines = (tail + piece.text).split("\n")
            tail = "" if piece.doc_end else lines.pop()
            yield from (line.rstrip("\r") for line in lines if line.strip())
        if tail.strip():
            yield tail.rstrip("\r")


def baseline_profile(files: list[SourceFile], tokenizer: ByteTokenizer | HFTokenizer, *, text_field: str = "text",
                     seed: int = 0, shuffle: bool = True, limit: int = BASELINE_PROMPTS) -> Profile:
    """The profile of the first ``limit`` prompts of ``files`` (all ``sft``, or all text formats)."""
    order = file_order(len(files), seed, 0, shuffle)
    specials = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    profile = Profile(time=utc_now())
    if files and all(f.format == "sft" for f in files):
        prompts = PromptEncoder(tokenizer)
        for i in order:
            for _, rec in read_records(files[i]):
                if profile.prompts >= limit:
                    return profile
                profile.add(prompts.profile_ids(rec))
        return profile
    for line in _lines(files, order, text_field):
        if profile.prompts >= limit:
            break
        profile.add([t for t in tokenizer.encode(line) if t not in specials])
    return profile
