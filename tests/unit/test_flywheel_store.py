"""kubeforge.store.flywheel: the layout keys, markers, prompt profiles, PSI and feedback scores."""

from __future__ import annotations

import math

import pytest
from kubeforge.store.flywheel import (
    PROMPT_LENGTH_EDGES,
    PSI_EPSILON,
    TOKEN_BUCKETS,
    DatasetManifest,
    DatasetMarker,
    FilterCount,
    Profile,
    ShardMarker,
    capture_prefix,
    dataset_prefix,
    feedback_score,
    length_bucket,
    merged,
    parse_shard_name,
    parse_version_dir,
    profile_key,
    profile_psi,
    psi,
    psi_level,
    shard_marker_key,
    shard_name,
    version_dir_name,
    version_marker_key,
    version_prefix,
)
from kubeforge.store.layout import FileDigest

pytestmark = pytest.mark.unit


def test_layout_keys() -> None:
    cap = capture_prefix("team-a", "chat")
    assert cap == "team-a/chat/capture"
    assert profile_key(cap, "chat-7f9c") == "team-a/chat/capture/profiles/chat-7f9c.json"
    assert dataset_prefix("team-a", "ds") == "team-a/ds/dataset"
    assert version_prefix("team-a", "ds", 3) == "team-a/ds/dataset/v-0000000003"
    assert version_marker_key(3) == "v-0000000003/commit.json"
    with pytest.raises(ValueError):
        capture_prefix("a/b", "chat")
    with pytest.raises(ValueError):
        version_dir_name(0)


def test_shard_names_sort_by_time_and_parse_back() -> None:
    a = shard_name("2026-12-02T18:27:33.123Z", "chat-0", 1)
    b = shard_name("2026-12-02T18:27:34.001Z", "chat-0", 0)
    assert a == "20261202T182733.123Z-chat-0-000001.tar" and a < b
    assert parse_shard_name(a) == ("20261202T182733.123Z", "chat-0", 1)
    assert parse_shard_name("README") is None and parse_shard_name(shard_marker_key(a)) is None
    assert shard_marker_key(f"requests/{a}") == "requests/20261202T182733.123Z-chat-0-000001.commit.json"
    with pytest.raises(ValueError):
        shard_name("2026-12-02T18:27:33.123Z", "bad/writer", 1)


def test_version_dirs_parse_and_sort() -> None:
    names = [version_dir_name(n) for n in (1, 2, 10, 100)]
    assert names == sorted(names) and [parse_version_dir(n) for n in names] == [1, 2, 10, 100]
    assert parse_version_dir("v-x") is None and parse_version_dir("step-0000000001") is None


def test_markers_round_trip() -> None:
    m = ShardMarker(kind="requests", writer="w", records=3, bytes=10, sha256="ab", first_time="t0", last_time="t1",
                    time="t2")
    assert ShardMarker.model_validate_json(m.to_json()) == m
    man = DatasetManifest(version=1, time="t", source="s3://b/p", source_shards=["requests/x.tar"], window_start=None,
                          window_end=None, filters=[FilterCount(name="records", records_in=2, records_out=1)],
                          records={"train": 1, "eval": 0}, dedup_ratio=0.0, content_sha256="00")
    assert DatasetManifest.model_validate_json(man.to_json()) == man and man.redacted == {} and man.feedback == {}
    mk = DatasetMarker(version=1, time="t", bytes=3, files={"train.tar": FileDigest(size=3, sha256="c")},
                       records={"train": 1, "eval": 0})
    assert DatasetMarker.model_validate_json(mk.to_json()) == mk


def test_length_buckets_are_inclusive_upper_edges_with_an_open_last() -> None:
    assert length_bucket(0) == 0 and length_bucket(8) == 0 and length_bucket(9) == 1
    assert length_bucket(PROMPT_LENGTH_EDGES[-1]) == len(PROMPT_LENGTH_EDGES) - 1
    assert length_bucket(10**6) == len(PROMPT_LENGTH_EDGES)


def test_profile_counts_and_merges() -> None:
    p = Profile()
    p.add([1, 2, 2 + TOKEN_BUCKETS])
    p.add(list(range(20)))
    assert p.prompts == 2 and sum(p.prompt_length) == 2 and p.prompt_length[0] == 1 and p.prompt_length[2] == 1
    assert p.token_frequency[2] == 3 and sum(p.token_frequency) == 23
    q = Profile.model_validate_json(p.to_json())
    both = merged([p, q])
    assert both.prompts == 4 and both.token_frequency == [2 * c for c in p.token_frequency]
    assert len(Profile().prompt_length) == len(PROMPT_LENGTH_EDGES) + 1 and len(Profile().token_frequency) == 64


def test_psi_is_zero_for_the_same_shares_and_grows_with_the_shift() -> None:
    assert psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0)
    # by hand: shares (0.5, 0.5) against (0.9, 0.1)
    expected = (0.9 - 0.5) * math.log(0.9 / 0.5) + (0.1 - 0.5) * math.log(0.1 / 0.5)
    assert psi([50, 50], [90, 10]) == pytest.approx(expected)
    assert psi([50, 50], [60, 40]) < psi([50, 50], [90, 10])
    # an empty bucket is taken at PSI_EPSILON, not zero: finite
    e = (1 - PSI_EPSILON) * math.log((1 - PSI_EPSILON) / PSI_EPSILON) + (PSI_EPSILON - 1) * math.log(
        PSI_EPSILON / (1 - PSI_EPSILON))
    assert psi([0, 10], [10, 0]) == pytest.approx(e, rel=1e-3) and math.isfinite(psi([0, 10], [10, 0]))
    with pytest.raises(ValueError, match="buckets differ"):
        psi([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least one count"):
        psi([0, 0], [1, 1])


def test_profile_psi_per_feature_and_levels() -> None:
    base, same, shifted = Profile(), Profile(), Profile()
    for i in range(200):
        base.add(list(range(i % 8 + 1)))
        same.add(list(range(i % 8 + 1)))
        shifted.add(list(range(300 + i % 50)))
    assert profile_psi(base, same) == {"prompt_length": pytest.approx(0.0), "token_frequency": pytest.approx(0.0)}
    moved = profile_psi(base, shifted)
    assert moved["prompt_length"] > 0.25 and moved["token_frequency"] > 0.25
    assert [psi_level(v) for v in (0.05, 0.1, 0.2, 0.25, 0.26)] == ["stable", "minor", "minor", "minor", "major"]
    assert psi_level(0.15, minor=0.2, major=0.3) == "stable"


def test_feedback_scores() -> None:
    assert [feedback_score(r) for r in (-1, 1, 2, 3, 4, 5)] == [0.0, 1.0, 0.25, 0.5, 0.75, 1.0]
    for bad in (0, 6, -2, True, 2.5, "5", None):
        with pytest.raises(ValueError, match="rating"):
            feedback_score(bad)  # type: ignore[arg-type]
