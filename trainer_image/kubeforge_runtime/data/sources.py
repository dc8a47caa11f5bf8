"""Where training text comes from: local files, folders and globs, or S3 prefixes; plain
text, JSONL, or WebDataset-style tar shards.

A source is read as a sequence of *pieces* per file, each piece a bounded amount of text
and flagged when it ends a document. Pieces, not whole files, are the unit so a 10 GB text
file never sits in memory, and so the loader can name a resumable position as
(file, piece, token offset). The listing is sorted, hence identical on every rank.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

#: The bundled corpus (see ``make_corpus.py``), for examples and tests.
BUILTIN_CORPUS = "builtin:corpus"
CORPUS_DIR = Path(__file__).parent / "corpus"
#: Text files are cut into pieces of about this many characters, at line ends.
PIECE_CHARS = 1 << 20

_SUFFIX_FORMAT = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl",
                  ".tar": "tar"}
#: SFT records come in tar shards (what curation writes) or JSONL
_SFT_SUFFIXES = (".tar", ".jsonl")
#: A dataset version's held-out split: never trained on when its folder is named (``sft`` only)
SFT_EVAL_SPLIT = "eval.tar"


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One input file and the format it is read in."""

    uri: str
    format: str


@dataclasses.dataclass(frozen=True)
class Piece:
    """A bounded span of text; ``doc_start``/``doc_end`` mark document boundaries, where the
    loader inserts bos and eos."""

    text: str
    doc_start: bool
    doc_end: bool


def _format_of(name: str, fmt: str) -> str | None:
    if fmt == "sft":
        return fmt if Path(name).suffix.lower() in _SFT_SUFFIXES else None
    if fmt != "auto":
        return fmt
    return _SUFFIX_FORMAT.get(Path(name).suffix.lower())


def _listed(name: str, fmt: str) -> str | None:
    """The format of a file found inside a folder, prefix or glob (None: not an input)."""
    if fmt == "sft" and Path(name).name == SFT_EVAL_SPLIT:
        return None
    return _format_of(name, fmt)


def _s3_client() -> Any:
    import boto3  # imported lazily: local runs need no AWS configuration at all

    # boto3 reads AWS_ENDPOINT_URL / AWS_REGION / credentials from the environment
    return boto3.client("s3")


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"bad S3 URI {uri!r}: expected s3://bucket/prefix")
    return bucket, key


def list_files(paths: list[str], fmt: str = "auto") -> list[SourceFile]:
    """Every readable input under ``paths``, sorted within each entry, entries in order.

    A file that does not match a known suffix is skipped inside a folder or prefix (READMEs,
    indexes) but is an error when named directly with ``format: auto``. With ``format: sft``
    only ``.tar`` and ``.jsonl`` files are inputs, and inside a folder or prefix ``eval.tar`` is
    not: naming a dataset version's folder trains on its ``train.tar`` alone.
    """
    out: list[SourceFile] = []
    for entry in paths:
        if entry == BUILTIN_CORPUS:
            entry = str(CORPUS_DIR)
        if entry.startswith("s3://"):
            bucket, prefix = _split_s3(entry)
            keys: list[str] = []
            for page in _s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
            found = [SourceFile(f"s3://{bucket}/{k}", f) for k in sorted(keys) if (f := _listed(k, fmt))]
        else:
            p = Path(entry)
            if p.is_file():
                f = _format_of(str(p), fmt)
                if f is None:
                    raise ValueError(f"data.paths: {p}: an sft input must be .tar or .jsonl" if fmt == "sft"
                                     else f"data.paths: cannot tell the format of {p}; set data.format")
                found = [SourceFile(str(p), f)]
            else:
                names = (sorted(str(q) for q in p.rglob("*") if q.is_file()) if p.is_dir()
                         else sorted(glob.glob(entry, recursive=True)))
                found = [SourceFile(n, f) for n in names if (f := _listed(n, fmt))]
        if not found:
            raise ValueError(f"data.paths: no input files at {entry!r}")
        out.extend(found)
    return out


def open_binary(uri: str) -> IO[bytes]:
    """A readable binary stream for a local path or an S3 object (streamed, not downloaded)."""
    if uri.startswith("s3://"):
        bucket, key = _split_s3(uri)
        body = _s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        # StreamingBody has readinto but no buffering: line iteration would read byte by byte
        return io.BufferedReader(body, buffer_size=1 << 20)
    return open(uri, "rb")


def _text_pieces(stream: IO[bytes]) -> Iterator[Piece]:
    """A text file is one document, cut at line ends into pieces of about PIECE_CHARS."""
    reader = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="")
    buf: list[str] = []
    size = 0
    first = True
    for line in reader:
        buf.append(line)
        size += len(line)
        if size >= PIECE_CHARS:
            yield Piece("".join(buf), first, False)
            buf, size, first = [], 0, False
    if buf or first:
        yield Piece("".join(buf), first, True)


def _json_text(obj: Any, field: str, where: str) -> str:
    if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
        raise ValueError(f"{where}: expected a JSON object with a string field {field!r} (data.text_field)")
    return str(obj[field])


def _jsonl_pieces(stream: IO[bytes], field: str, uri: str) -> Iterator[Piece]:
    for n, raw in enumerate(stream, 1):
        line = raw.strip()
        if line:
            yield Piece(_json_text(json.loads(line), field, f"{uri}:{n}"), True, True)


def _tar_pieces(stream: IO[bytes], field: str, uri: str) -> Iterator[Piece]:
    """WebDataset convention: members sharing a key (name up to the first dot) form one
    sample; its text is the ``.txt`` member, else ``field`` of the ``.json`` member."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = os.path.basename(member.name)
            ext = name.partition(".")[2].lower()
            if ext not in ("txt", "json"):
                continue
            f = tar.extractfile(member)
            assert f is not None
            data = f.read()
            if ext == "txt":
                yield Piece(data.decode("utf-8", errors="replace"), True, True)
            else:
                yield Piece(_json_text(json.loads(data), field, f"{uri}:{member.name}"), True, True)


def read_pieces(src: SourceFile, text_field: str = "text") -> Iterator[Piece]:
    """The pieces of one file, in a fixed order."""
    with open_binary(src.uri) as stream:
        if src.format == "text":
            yield from _text_pieces(stream)
        elif src.format == "jsonl":
            yield from _jsonl_pieces(stream, text_field, src.uri)
        elif src.format == "tar":
            yield from _tar_pieces(stream, text_field, src.uri)
        elif src.format == "sft":
            raise ValueError(f"{src.uri}: sft files are read as records (data.sft), not as text pieces")
        else:
            raise ValueError(f"unknown data format {src.format!r}")
