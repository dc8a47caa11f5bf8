"""The flywheel's part of the store layout: captured traffic, feedback, prompt profiles and
curated dataset versions, and the drift arithmetic (PSI) both sides share. No torch, no kopf.

Under a store root (a CheckpointPolicy's storage, or ``spec.logging.store.uri``)::

    <namespace>/<service>/capture/requests/<shard>.tar            WebDataset shard of request records
    <namespace>/<service>/capture/requests/<shard>.commit.json    its marker, written last
    <namespace>/<service>/capture/feedback/<shard>.tar (+ .commit.json)   feedback records
    <namespace>/<service>/capture/profiles/<writer>.json          one server pod's live prompt profile
    <namespace>/<dataset>/dataset/v-0000000001/{train.tar,eval.tar,manifest.json}
    <namespace>/<dataset>/dataset/v-0000000001/commit.json        the version's marker, written last

``<shard>`` is ``<UTC time of its first record, 20261202T182733.123Z>-<writer>-<seq 6 digits>``,
so names sort by time. A shard counts only once its marker exists (the checkpoints' rule: a
half-written shard is never read); the marker carries its size, sha256, record count and the
time window of its records. A tar member is ``<record id>.json`` (WebDataset: the key is the
name up to the first dot). A dataset version is written whole (its files, then
``manifest.json``, then ``commit.json`` with every file's digest); a curation killed midway
leaves no marker, and the next version number is taken only from committed versions.

Record formats (JSON objects; ``docs/flywheel.md`` documents every field):

- request: ``type: "request"``, ``id`` (the completion id), ``time`` (RFC 3339),
  ``model``, ``revision``, ``endpoint`` ("completions" | "chat.completions"), ``prompt``
  (text, or null for chat), ``messages`` (chat, or null), ``completion``, ``n``,
  ``prompt_tokens``, ``completion_tokens``, ``finish_reason``, ``ttft_s``, ``latency_s``,
  ``redacted`` (what capture replaced, by type), ``truncated``.
- feedback: ``type: "feedback"``, ``id`` (a feedback id), ``completion_id``, ``time``,
  ``rating`` (-1/+1 or 1..5), ``correction`` (text or null), ``tags``.
- SFT (a dataset version's ``train.tar``/``eval.tar``): ``id``, ``prompt`` (text, or null
  for chat), ``messages`` (chat, or null), ``target``, ``source`` (the completion id),
  ``rating``, ``corrected``.
"""

from __future__ import annotations

import builtins
import math
import re
from collections.abc import Iterable, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from kubeforge.store.layout import FileDigest, _check_name

CAPTURE_DIR = "capture"
REQUESTS = "requests"
FEEDBACK = "feedback"
PROFILES = "profiles"
DATASET_DIR = "dataset"
SHARD_SUFFIX = ".tar"
SHARD_MARKER_SUFFIX = ".commit.json"
MANIFEST_NAME = "manifest.json"
VERSION_MARKER_NAME = "commit.json"
TRAIN_SPLIT = "train.tar"
EVAL_SPLIT = "eval.tar"
#: the baseline profile a trainer writes into its export, next to the weights
BASELINE_PROFILE_NAME = "data-profile.json"
VERSION_DIGITS = 10
_VERSION_DIR = re.compile(r"^v-(\d+)$")
_SHARD = re.compile(r"^(\d{8}T\d{6}\.\d{3}Z)-([A-Za-z0-9.-]+)-(\d{6})\.tar$")


def capture_prefix(namespace: str, service: str) -> str:
    return f"{_check_name(namespace, 'namespace')}/{_check_name(service, 'service')}/{CAPTURE_DIR}"


def shard_name(first_time: str, writer: str, seq: int) -> str:
    """``first_time`` as ``layout.utc_now()`` gives it; ``writer`` a pod name (DNS label)."""
    compact = first_time.replace("-", "").replace(":", "")  # 2026-12-02T18:27:33.123Z -> 20261202T182733.123Z
    if not re.fullmatch(r"[A-Za-z0-9.-]+", writer):
        raise ValueError(f"writer must be a DNS-label-like name, got {writer!r}")
    return f"{compact}-{writer}-{seq:06d}{SHARD_SUFFIX}"


def parse_shard_name(name: str) -> tuple[str, str, int] | None:
    """(compact first time, writer, seq) of a shard file name; None for anything else."""
    m = _SHARD.match(name)
    return (m.group(1), m.group(2), int(m.group(3))) if m else None


def shard_marker_key(shard_key: str) -> str:
    return shard_key.removesuffix(SHARD_SUFFIX) + SHARD_MARKER_SUFFIX


def profile_key(capture: str, writer: str) -> str:
    return f"{capture}/{PROFILES}/{writer}.json"


def dataset_prefix(namespace: str, dataset: str) -> str:
    return f"{_check_name(namespace, 'namespace')}/{_check_name(dataset, 'dataset')}/{DATASET_DIR}"


def version_dir_name(version: int) -> str:
    if version < 1:
        raise ValueError(f"version must be >= 1, got {version}")
    return f"v-{version:0{VERSION_DIGITS}d}"


def parse_version_dir(name: str) -> int | None:
    m = _VERSION_DIR.match(name)
    return int(m.group(1)) if m else None


def version_prefix(namespace: str, dataset: str, version: int) -> str:
    return f"{dataset_prefix(namespace, dataset)}/{version_dir_name(version)}"


class ShardMarker(BaseModel):
    """The commit marker of one capture shard: its existence is the commit."""

    model_config = ConfigDict(frozen=True)
    version: int = 1
    kind: str = Field(description="requests or feedback")
    writer: str
    records: int
    bytes: int
    sha256: str
    first_time: str
    last_time: str
    time: str = Field(description="when the shard was committed")

    def to_json(self) -> builtins.bytes:
        return self.model_dump_json(indent=1).encode()


class FilterCount(BaseModel):
    """One curation step: records in, records out."""

    model_config = ConfigDict(frozen=True)
    name: str
    records_in: int
    records_out: int


class DatasetManifest(BaseModel):
    """``manifest.json`` of a dataset version: what went in, what each filter kept, what came out."""

    model_config = ConfigDict(frozen=True)
    version: int
    time: str
    source: str = Field(description="the capture prefix read")
    source_shards: list[str] = Field(description="keys of the committed shards read (requests and feedback)")
    skipped_shards: list[str] = Field(default_factory=list, description="shards skipped as corrupt, with why")
    window_start: str | None
    window_end: str | None
    filters: list[FilterCount]
    records: dict[str, int] = Field(description="records per split: train, eval")
    dedup_ratio: float = Field(description="records removed by the exact and near-duplicate steps / records before them")
    content_sha256: str = Field(description="sha256 over the splits' files in order: the version's content hash")
    settings: dict[str, object] = Field(default_factory=dict, description="the curation settings used")
    redacted: dict[str, int] = Field(default_factory=dict, description="replacements by the redaction step, by type")
    feedback: dict[str, int] = Field(default_factory=dict, description=(
        "feedback records read, malformed, joined to a request read, and corrections used as targets"))

    def to_json(self) -> builtins.bytes:
        return self.model_dump_json(indent=1).encode()


class DatasetMarker(BaseModel):
    """``commit.json`` of a dataset version, written after every file and the manifest."""

    model_config = ConfigDict(frozen=True)
    version: int
    time: str
    bytes: int
    files: dict[str, FileDigest]
    records: dict[str, int]

    def to_json(self) -> builtins.bytes:
        return self.model_dump_json(indent=1).encode()


def feedback_score(rating: int) -> float:
    """A rating on 0..1: -1 is 0 and +1 is 1 (thumbs), r on the 1..5 scale is (r - 1) / 4.

    1 belongs to both scales and is read as +1 (a thumbs-up, the common case): a record does
    not say which scale its client used, so a 1..5 client's lowest rating scores as the best.
    Such a client should send -1 for its worst."""
    if isinstance(rating, bool) or not isinstance(rating, int) or not (rating == -1 or 1 <= rating <= 5):
        raise ValueError(f"rating must be -1, +1 or 1..5, got {rating!r}")
    if rating == -1:
        return 0.0
    if rating == 1:
        return 1.0
    return (rating - 1) / 4


def version_marker_key(version: int) -> str:
    """The commit marker of a dataset version, relative to the dataset dir."""
    return f"{version_dir_name(version)}/{VERSION_MARKER_NAME}"


# ---------------------------------------------------------------------------- prompt profiles

#: Upper edges (inclusive) of the prompt-length buckets, in tokens; the last bucket is open.
PROMPT_LENGTH_EDGES: tuple[int, ...] = (8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096)
#: Token ids fall into ``id % TOKEN_BUCKETS`` (fixed, whatever the vocabulary).
TOKEN_BUCKETS = 64
FEATURES = ("prompt_length", "token_frequency")


def length_bucket(n_tokens: int) -> int:
    for i, edge in enumerate(PROMPT_LENGTH_EDGES):
        if n_tokens <= edge:
            return i
    return len(PROMPT_LENGTH_EDGES)


class Profile(BaseModel):
    """Histograms of prompts over fixed buckets: what a baseline (training data) and a live
    profile (served prompts) hold. ``prompts`` counts the prompts in it."""

    model_config = ConfigDict(frozen=False)
    version: int = 1
    prompts: int = 0
    prompt_length: list[int] = Field(default_factory=lambda: [0] * (len(PROMPT_LENGTH_EDGES) + 1))
    token_frequency: list[int] = Field(default_factory=lambda: [0] * TOKEN_BUCKETS)
    time: str | None = None

    def add(self, token_ids: Sequence[int]) -> None:
        self.prompts += 1
        self.prompt_length[length_bucket(len(token_ids))] += 1
        tf = self.token_frequency
        for t in token_ids:
            tf[t % TOKEN_BUCKETS] += 1

    def merge(self, other: Profile) -> None:
        self.prompts += other.prompts
        self.prompt_length = [a + b for a, b in zip(self.prompt_length, other.prompt_length, strict=True)]
        self.token_frequency = [a + b for a, b in zip(self.token_frequency, other.token_frequency, strict=True)]

    def to_json(self) -> builtins.bytes:
        return self.model_dump_json().encode()


def merged(profiles: Iterable[Profile]) -> Profile:
    out = Profile()
    for p in profiles:
        out.merge(p)
    return out


#: A bucket's share is never taken below this in PSI (an empty bucket would make it infinite).
PSI_EPSILON = 1e-4


def psi(expected: Sequence[int], actual: Sequence[int]) -> float:
    """Population Stability Index of ``actual`` against ``expected`` (bucket counts):
    sum over buckets of (a - e) * ln(a / e) on the shares, each share at least PSI_EPSILON.
    0 is no change; below 0.1 is stable, 0.1-0.25 a minor shift, above 0.25 a major one."""
    if len(expected) != len(actual):
        raise ValueError(f"buckets differ: {len(expected)} expected, {len(actual)} actual")
    te, ta = sum(expected), sum(actual)
    if te <= 0 or ta <= 0:
        raise ValueError("both histograms need at least one count")
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        pe = max(e / te, PSI_EPSILON)
        pa = max(a / ta, PSI_EPSILON)
        total += (pa - pe) * math.log(pa / pe)
    return total


def profile_psi(baseline: Profile, live: Profile) -> dict[str, float]:
    """PSI per feature (``FEATURES``) of a live profile against a baseline."""
    return {f: psi(getattr(baseline, f), getattr(live, f)) for f in FEATURES}


def psi_level(value: float, minor: float = 0.1, major: float = 0.25) -> str:
    """``stable`` (< minor), ``minor`` (minor..major) or ``major`` (> major)."""
    if value > major:
        return "major"
    return "minor" if value >= minor else "stable"


def feature_counts(profile: Profile) -> Mapping[str, list[int]]:
    return {f: list(getattr(profile, f)) for f in FEATURES}
