"""Curation (python -m kubeforge_runtime.curate) on generated capture shards: every step's
counts, skipped shards, a killed run, stable splits across versions, the empty source."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import random
import tarfile
from pathlib import Path
from typing import Any

import pytest
from kubeforge.store import open_store
from kubeforge.store.backends import FileBackend, ObjectBackend, StoreError
from kubeforge.store.flywheel import (
    FEEDBACK,
    REQUESTS,
    DatasetManifest,
    DatasetMarker,
    ShardMarker,
    shard_marker_key,
    shard_name,
    version_dir_name,
)
from kubeforge_runtime.curate import (
    CurationSettings,
    curate,
    eval_split,
    jaccard,
    near_duplicate_pairs,
    parse_settings,
)
from kubeforge_runtime.curate.__main__ import main
from kubeforge_runtime.curate.dedup import shingles
from kubeforge_runtime.curate.filters import alpha_ratio, repeat_ratio, script_share
from kubeforge_runtime.curate.version import committed_versions

pytestmark = pytest.mark.runtime
T0 = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC)
VOCAB = [a + b + c for a in ("b", "d", "f", "k", "l", "m", "p", "r", "s", "t") for b in "aeiou"
         for c in ("n", "r", "l", "st", "m", "nd")]  # 300 letter-only words


def ts(i: float) -> str:
    return (T0 + dt.timedelta(seconds=i)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def request(i: int, prompt: str | None, completion: str, *, t: float | None = None, finish: str = "stop",
            messages: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {"type": "request", "id": f"cmpl-{i:08x}{'ab' * 8}", "time": ts(i if t is None else t),
            "model": "m", "revision": "r1", "endpoint": "completions" if messages is None else "chat.completions",
            "prompt": prompt, "messages": messages, "completion": completion, "n": 1, "prompt_tokens": 3,
            "completion_tokens": 5, "finish_reason": finish, "ttft_s": 0.01, "latency_s": 0.1, "redacted": {},
            "truncated": False}


def feedback(n: int, completion_id: str, rating: int, *, t: float, correction: str | None = None) -> dict[str, Any]:
    return {"type": "feedback", "id": f"fb-{n:06d}", "completion_id": completion_id, "time": ts(t),
            "rating": rating, "correction": correction, "tags": []}


def shard_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def put_shard(backend: ObjectBackend, kind: str, records: list[dict[str, Any]], seq: int, *,
              commit: bool = True, damage: str | None = None, extra: list[tuple[str, bytes]] = ()) -> str:
    """One shard as capture writes it: the tar, then its marker. ``damage``: 'flip' changes a
    byte after the marker was computed, 'truncate' cuts the tar."""
    members = [(f"{r['id']}.json", json.dumps(r).encode()) for r in records] + list(extra)
    data = shard_bytes(members)
    times = sorted(r["time"] for r in records) or [ts(0)]
    key = f"{kind}/{shard_name(times[0], 'serve-0', seq)}"
    marker = ShardMarker(kind=kind, writer="serve-0", records=len(members), bytes=len(data),
                         sha256=hashlib.sha256(data).hexdigest(), first_time=times[0], last_time=times[-1],
                         time=times[-1])
    if damage == "flip":
        data = data[:600] + bytes([data[600] ^ 1]) + data[601:]
    elif damage == "truncate":
        data = data[:len(data) // 2]
    backend.put_bytes(key, data)
    if commit:
        backend.put_bytes(shard_marker_key(key), marker.to_json())
    return key


class Capture:
    """The planted capture of the end-to-end test, and what each step must count."""

    def __init__(self, backend: ObjectBackend) -> None:
        rng = random.Random(7)
        base = []
        for i in range(40):
            base.append(request(i, f"question {i}: {words(rng, 14)}", words(rng, 40)))
        # chat records (their prompt is the messages)
        for i in (25, 26, 27):
            base[i] = request(i, None, words(rng, 40), messages=[
                {"role": "system", "content": "be brief"}, {"role": "user", "content": words(rng, 12)}])
        base[8]["prompt"] += " mail me at alice@example.com"
        base[9]["completion"] += " call +1 (555) 123-4567"
        base[19]["completion"] = ""  # length
        base[20]["finish_reason"] = "length"  # dropped with dropFinishReasons [length]
        base[21]["finish_reason"] = "length"  # ... but corrected: kept
        base[22]["completion"] = " ".join(rng.choice(["+++", "--", "**", "##", "=="]) for _ in range(30))  # alpha
        base[23]["completion"] = "again " * 30  # repeat ratio
        base[24]["completion"] = "привет мир это русский текст и он длинный " * 3  # script
        near = []
        for k in range(5):  # the last word of the target changed: Jaccard (n-1)/(n+1) on 5-shingles
            rec = dict(base[k])
            rec["id"], rec["time"] = request(100 + k, "", "")["id"], ts(100 + k)
            rec["completion"] = rec["completion"].rsplit(" ", 1)[0] + " zzzend"
            near.append(rec)
        exact = []
        for k in range(3):
            rec = dict(base[5 + k])
            rec["id"], rec["time"] = request(200 + k, "", "")["id"], ts(200 + k)
            exact.append(rec)
        same_id = dict(base[30], time=ts(300), completion=words(rng, 40))  # a later record, same completion id
        self.base, self.near, self.exact = base, near, exact
        ids = [r["id"] for r in base]
        self.correction_17 = words(rng, 30)
        self.correction_18 = words(rng, 30)
        fb = [
            feedback(1, ids[11], -1, t=400), feedback(2, ids[12], 2, t=401),  # low: dropped
            feedback(3, ids[13], 3, t=402), feedback(4, ids[14], 5, t=403),  # 0.5 and 1.0: kept
            feedback(5, ids[15], -1, t=404), feedback(6, ids[15], 1, t=405),  # the latest wins: kept
            feedback(7, ids[16], 1, t=406), feedback(8, ids[16], -1, t=407),  # the latest wins: dropped
            feedback(9, ids[17], 5, t=408, correction=self.correction_17),
            feedback(10, ids[10], 4, t=409, correction=words(rng, 20) + " write to bob@example.org"),
            feedback(11, ids[18], 1, t=410, correction=self.correction_18),
            feedback(12, ids[18], 4, t=411),  # a later rating without correction: the correction stays
            feedback(13, ids[21], 4, t=412, correction=words(rng, 25)),
            feedback(14, "cmpl-neverseen", 1, t=413),  # its request was not captured
        ]
        self.skipped_keys = [
            put_shard(backend, REQUESTS, [request(500 + i, words(rng, 10), words(rng, 30)) for i in range(3)], 90,
                      damage="flip"),
            put_shard(backend, REQUESTS, [request(600 + i, words(rng, 10), words(rng, 30)) for i in range(3)], 91,
                      damage="truncate"),
            put_shard(backend, REQUESTS, [request(700, words(rng, 10), words(rng, 30))], 92, commit=False),
            put_shard(backend, FEEDBACK, [feedback(99, ids[0], -1, t=500)], 93, commit=False),
        ]
        malformed = [("bad.json", b"{not json"), ("nocompletion.json", json.dumps(
            {k: v for k, v in request(800, "p", "c").items() if k != "completion"}).encode())]
        self.read_keys = [
            put_shard(backend, REQUESTS, base[:20], 1),
            put_shard(backend, REQUESTS, base[20:] + near, 2, extra=malformed),
            put_shard(backend, REQUESTS, exact + [same_id], 3),
            put_shard(backend, FEEDBACK, fb, 4),
        ]
        self.kept_ids = {r["id"] for r in base} - {ids[i] for i in (11, 12, 16, 19, 20, 22, 23, 24)}


SETTINGS = json.dumps({"filters": {"dropFinishReasons": ["length"]}})
EXPECTED_FILTERS = [("records", 51, 48), ("feedback", 48, 45), ("redact", 45, 45), ("length", 45, 44),
                    ("finish_reason", 44, 43), ("quality", 43, 41), ("script", 41, 40), ("exact_dedup", 40, 37),
                    ("near_dedup", 37, 32)]


def read_split(path: Path) -> list[dict[str, Any]]:
    with tarfile.open(path) as tar:
        out = []
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None and m.mtime == 0
            rec = json.loads(f.read())
            assert m.name == f"{rec['id']}.json"
            out.append(rec)
        return out


def run(source: str, output: str, *args: str, settings: str = SETTINGS, env: dict[str, str] | None = None,
        capsys: pytest.CaptureFixture[str] | None = None) -> tuple[int, DatasetManifest | None]:
    rc = main(["--source", source, "--output", output, "--settings", settings, *args], env=env or {})
    manifest = None
    if capsys is not None:
        out = capsys.readouterr().out.strip()
        if rc == 0:
            lines = out.splitlines()
            assert len(lines) == 1
            manifest = DatasetManifest.model_validate_json(lines[0])
    return rc, manifest


def test_curation_counts_every_step_and_skips_bad_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cap = Capture(FileBackend(tmp_path / "capture"))
    out = tmp_path / "dataset"
    rc, manifest = run((tmp_path / "capture").as_uri(), out.as_uri(), capsys=capsys)
    assert rc == 0 and manifest is not None
    assert [(f.name, f.records_in, f.records_out) for f in manifest.filters] == EXPECTED_FILTERS
    assert manifest.dedup_ratio == pytest.approx(8 / 40)
    assert manifest.source_shards == sorted(cap.read_keys[:3]) + [cap.read_keys[3]]
    skipped = dict(s.split(": ", 1) for s in manifest.skipped_shards)
    assert set(skipped) == set(cap.skipped_keys)
    assert "sha256" in skipped[cap.skipped_keys[0]] and "truncated" in skipped[cap.skipped_keys[1]]
    assert "no commit marker" in skipped[cap.skipped_keys[2]] and "no commit marker" in skipped[cap.skipped_keys[3]]
    assert manifest.redacted == {"EMAIL": 2, "PHONE": 1}
    assert manifest.feedback == {"records": 14, "malformed": 0, "joined": 13, "corrections": 4}
    assert manifest.window_start == ts(0) and manifest.window_end == ts(202)
    assert manifest.settings["filters"]["dropFinishReasons"] == ["length"]  # type: ignore[index]
    assert manifest.settings["dedup"]["nearDuplicateThreshold"] == 0.8  # type: ignore[index]

    vdir = out / version_dir_name(1)
    train, evals = read_split(vdir / "train.tar"), read_split(vdir / "eval.tar")
    assert manifest.records == {"train": len(train), "eval": len(evals)} and len(train) + len(evals) == 32
    assert {r["id"] for r in train + evals} == cap.kept_ids
    assert all(eval_split(r["id"], 10) for r in evals) and not any(eval_split(r["id"], 10) for r in train)
    by_id = {r["id"]: r for r in train + evals}
    ids = [r["id"] for r in cap.base]
    assert by_id[ids[17]]["target"] == cap.correction_17 and by_id[ids[17]]["corrected"] is True
    assert by_id[ids[18]]["target"] == cap.correction_18 and by_id[ids[18]]["rating"] == 4
    assert by_id[ids[10]]["target"].endswith("write to <EMAIL>")
    assert "<EMAIL>" in by_id[ids[8]]["prompt"] and "<PHONE>" in by_id[ids[9]]["target"]
    assert by_id[ids[25]]["prompt"] is None and by_id[ids[25]]["messages"][0] == {"role": "system",
                                                                                     "content": "be brief"}
    assert by_id[ids[0]] == {"id": ids[0], "prompt": cap.base[0]["prompt"], "messages": None,
                             "target": cap.base[0]["completion"], "source": ids[0], "rating": None,
                             "corrected": False}
    assert by_id[ids[30]]["target"] == cap.base[30]["completion"]  # the earlier record of a repeated id

    marker = DatasetMarker.model_validate_json((vdir / "commit.json").read_bytes())
    assert marker.version == 1 and marker.records == manifest.records
    for name, digest in marker.files.items():
        data = (vdir / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (digest.size, digest.sha256)
    assert set(marker.files) == {"train.tar", "eval.tar", "manifest.json"}
    content = hashlib.sha256((vdir / "train.tar").read_bytes() + (vdir / "eval.tar").read_bytes()).hexdigest()
    assert manifest.content_sha256 == content
    assert DatasetManifest.model_validate_json((vdir / "manifest.json").read_bytes()) == manifest


def test_same_input_same_bytes_and_content_hash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Capture(FileBackend(tmp_path / "capture"))
    hashes = []
    for name in ("a", "b"):
        rc, manifest = run((tmp_path / "capture").as_uri(), (tmp_path / name).as_uri(), capsys=capsys)
        assert rc == 0 and manifest is not None
        hashes.append(manifest.content_sha256)
    assert hashes[0] == hashes[1]
    for split in ("train.tar", "eval.tar"):
        a = (tmp_path / "a" / version_dir_name(1) / split).read_bytes()
        assert a == (tmp_path / "b" / version_dir_name(1) / split).read_bytes()


def test_a_run_killed_before_its_marker_leaves_no_version_and_the_rerun_completes_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    Capture(FileBackend(tmp_path / "capture"))
    src, out = (tmp_path / "capture").as_uri(), tmp_path / "dataset"
    real_put = FileBackend.put_bytes

    def failing_put(self: FileBackend, key: str, data: bytes) -> None:
        if key.endswith("commit.json") and "dataset" in str(self.root):
            raise StoreError("the pod was killed")
        real_put(self, key, data)

    monkeypatch.setattr(FileBackend, "put_bytes", failing_put)
    rc, _ = run(src, out.as_uri(), capsys=capsys)
    assert rc == 1
    vdir = out / version_dir_name(1)
    assert (vdir / "train.tar").exists() and not (vdir / "commit.json").exists()
    (vdir / "train.tar").write_bytes(b"half a file")  # what a kill during the upload leaves
    assert committed_versions(FileBackend(out)) == []

    monkeypatch.setattr(FileBackend, "put_bytes", real_put)
    rc, manifest = run(src, out.as_uri(), capsys=capsys)
    assert rc == 0 and manifest is not None and manifest.version == 1
    assert committed_versions(FileBackend(out)) == [1]
    marker = DatasetMarker.model_validate_json((vdir / "commit.json").read_bytes())
    for name, digest in marker.files.items():
        assert hashlib.sha256((vdir / name).read_bytes()).hexdigest() == digest.sha256
    assert sorted(p.name for p in vdir.iterdir()) == ["commit.json", "eval.tar", "manifest.json", "train.tar"]


def test_splits_are_stable_across_versions_with_more_data(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    backend = FileBackend(tmp_path / "capture")
    rng = random.Random(3)
    first = [request(i, words(rng, 12), words(rng, 30)) for i in range(150)]
    put_shard(backend, REQUESTS, first, 1)
    src, out = (tmp_path / "capture").as_uri(), tmp_path / "dataset"
    settings = json.dumps({"split": {"evalPercent": 30}})
    rc, v1 = run(src, out.as_uri(), settings=settings, capsys=capsys)
    assert rc == 0 and v1 is not None and v1.version == 1
    put_shard(backend, REQUESTS, [request(1000 + i, words(rng, 12), words(rng, 30)) for i in range(150)], 2)
    rc, v2 = run(src, out.as_uri(), settings=settings, capsys=capsys)
    assert rc == 0 and v2 is not None and v2.version == 2 and len(v2.source_shards) == 2

    def split_of(version: int) -> dict[str, str]:
        vdir = out / version_dir_name(version)
        return {r["id"]: s for s in ("train", "eval") for r in read_split(vdir / f"{s}.tar")}

    one, two = split_of(1), split_of(2)
    assert len(one) == 150 and len(two) == 300 and set(one) < set(two)
    assert all(two[i] == s for i, s in one.items())
    assert 0.2 < sum(s == "eval" for s in two.values()) / 300 < 0.4


def test_empty_source_exits_3_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dataset"
    rc, _ = run((tmp_path / "nothing").as_uri(), out.as_uri(), capsys=capsys)
    assert rc == 3 and not out.exists() and not (tmp_path / "nothing").exists()
    backend = FileBackend(tmp_path / "capture")
    put_shard(backend, REQUESTS, [request(1, "a prompt here", "a completion here")], 1, commit=False)
    put_shard(backend, FEEDBACK, [feedback(1, "cmpl-x", 1, t=1)], 2)
    rc = main(["--source", (tmp_path / "capture").as_uri(), "--output", out.as_uri()], env={})
    err = capsys.readouterr().err
    assert rc == 3 and "source empty" in err and "no commit marker" in err and not out.exists()


def test_bad_settings_are_a_configuration_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bad, says in [({"dedup": {"nearDuplicateTreshold": 0.8}}, "dedup.nearDuplicateTreshold: unknown key"),
                      ({"redact": {"patterns": {"ID": "("}}}, "not a valid regular expression"),
                      ({"filters": {"minTargetChars": 10, "maxTargetChars": 5}}, "minTargetChars"),
                      ({"filters": {"scripts": ["latin"]}}, "Unicode script name")]:
        rc, _ = run((tmp_path / "c").as_uri(), (tmp_path / "d").as_uri(), settings=json.dumps(bad))
        assert rc == 78
        assert says in capsys.readouterr().err
    settings_file = tmp_path / "s.json"
    settings_file.write_text(json.dumps({"redact": {"patterns": [{"name": "TICKET", "regex": r"T-\d+"}]}}))
    assert parse_settings(f"@{settings_file}").redact.patterns == {"TICKET": r"T-\d+"}


def test_a_named_version_already_committed_is_not_rewritten(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    Capture(FileBackend(tmp_path / "capture"))
    src, out = (tmp_path / "capture").as_uri(), tmp_path / "dataset"
    rc, first = run(src, out.as_uri(), "--version", "1", capsys=capsys)
    assert rc == 0 and first is not None
    marker = (out / version_dir_name(1) / "commit.json").read_bytes()
    rc, again = run(src, out.as_uri(), "--version", "1", capsys=capsys)
    assert rc == 0 and again == first and (out / version_dir_name(1) / "commit.json").read_bytes() == marker
    rc, _ = run(src, out.as_uri(), capsys=capsys)
    assert rc == 0 and committed_versions(FileBackend(out)) == [1, 2]
    rc, _ = run(src, out.as_uri(), "--version", "1", capsys=capsys)
    assert rc == 0
    (out / version_dir_name(1) / "commit.json").unlink()
    rc, _ = run(src, out.as_uri(), "--version", "1", capsys=capsys)
    assert rc == 78  # not after the newest committed (2): versions only grow


def test_curation_on_s3(tmp_path: Path, s3_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    root = s3_server.uri(f"curate/{tmp_path.name}")
    store = open_store(root, **s3_server.store_options())
    Capture(open_store(f"{root}/ns/svc/capture", **s3_server.store_options()).backend)
    env = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
           "AWS_REGION": s3_server.region}
    rc, manifest = run(f"{root}/ns/svc/capture", f"{root}/ns/ds/dataset", "--s3-endpoint", s3_server.endpoint,
                       env=env, capsys=capsys)
    assert rc == 0 and manifest is not None
    assert [(f.name, f.records_in, f.records_out) for f in manifest.filters] == EXPECTED_FILTERS
    keys = {o.key for o in store.backend.list("ns/ds/dataset")}
    assert {f"ns/ds/dataset/{version_dir_name(1)}/{n}" for n in
            ("train.tar", "eval.tar", "manifest.json", "commit.json")} == keys
    local = tmp_path / "local"
    Capture(FileBackend(local / "capture"))
    rc, same = run((local / "capture").as_uri(), (local / "dataset").as_uri(), capsys=capsys)
    assert rc == 0 and same is not None and same.content_sha256 == manifest.content_sha256


def test_near_duplicates_match_exact_jaccard_on_a_planted_corpus() -> None:
    """Templated sentences (many pairs share phrases) and planted copies with 0 to 12 words
    changed, so many pairs lie near the threshold: every pair found is one (the exact check),
    and LSH's lowered index finds nearly all of them."""
    from kubeforge_runtime.data.make_corpus import sentence

    rng = random.Random(1)
    docs = [" ".join(sentence(rng) for _ in range(rng.randint(4, 10))) for _ in range(1000)]
    for _ in range(500):
        w = docs[rng.randrange(1000)].split()
        for _ in range(rng.choice([0, 1, 2, 3, 5, 8, 12])):
            w[rng.randrange(len(w))] = rng.choice(["alpha", "beta", "gamma", "delta"])
        docs.append(" ".join(w))
    sets = [set(shingles(d, 5)) for d in docs]
    by_shingle: dict[bytes, list[int]] = {}
    for i, sh in enumerate(sets):
        for g in sh:
            by_shingle.setdefault(g, []).append(i)
    sharing = {(a, b) for ids in by_shingle.values() for k, a in enumerate(ids) for b in ids[k + 1:]}
    truth = {(i, j) for i, j in sharing if len(sets[i] & sets[j]) / len(sets[i] | sets[j]) >= 0.8}
    assert all(jaccard(docs[i], docs[j]) >= 0.8 for i, j in truth)
    found = near_duplicate_pairs(docs, threshold=0.8)
    recall = len(truth & found) / len(truth)
    assert len(truth) > 100 and found <= truth and recall >= 0.95, (len(found), len(truth), recall)


def test_filters_measure_what_they_say() -> None:
    assert alpha_ratio("abc def") == 1.0 and alpha_ratio("ab 12") == 0.5 and alpha_ratio("  ") == 0.0
    assert alpha_ratio("héllo wörld") == 1.0
    assert repeat_ratio("one two three four") == 0.0
    assert repeat_ratio("a b c a b c a b c") == pytest.approx(3 / 7)
    assert script_share("hello", ["Latin"]) == 1.0 and script_share("hello", ["Cyrillic"]) == 0.0
    assert script_share("привет hello", ["Cyrillic"]) == pytest.approx(6 / 11)
    assert script_share("中文 ｱｲ", ["Han"]) == 0.5 and script_share("1234 !!", ["Greek"]) == 1.0


def test_the_pool_gives_the_same_result_as_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import kubeforge_runtime.curate.pipeline as pipeline

    rng = random.Random(5)
    reqs: list[object] = [request(i, words(rng, 10), words(rng, 30)) for i in range(400)]
    reqs += [dict(r, id=f"cmpl-dup{i}", time=ts(1000 + i)) for i, r in enumerate(reqs[:50])]  # type: ignore[arg-type]
    one = curate(reqs, [], CurationSettings(), workers=1)
    monkeypatch.setattr(pipeline, "PARALLEL_MIN_RECORDS", 10)
    two = curate(reqs, [], CurationSettings(), workers=2)
    assert one == two and one.filters[-2].records_out == 400


def test_of_near_duplicates_the_corrected_then_the_better_rated_is_kept() -> None:
    """Three answers to one long prompt, near duplicates of each other: an unrated one first, a
    5-star one, and a +1 with the user's correction last. The correction is what stays; without
    it, the 5-star one (earlier records are kept only among equals)."""
    rng = random.Random(9)
    prompt, answer = words(rng, 60), words(rng, 3)
    reqs: list[object] = [request(i, prompt, answer + f" w{i}") for i in range(3)]
    ids = [r["id"] for r in reqs]  # type: ignore[index]
    fb = [feedback(0, ids[1], 5, t=10), feedback(1, ids[2], 1, t=11, correction=answer + " fixed")]
    kept = curate(reqs, fb, CurationSettings(), workers=1)
    assert [r["source"] for r in kept.train + kept.eval] == [ids[2]], kept
    assert (kept.train + kept.eval)[0]["target"] == answer + " fixed"
    kept = curate(reqs, fb[:1], CurationSettings(), workers=1)
    assert [r["source"] for r in kept.train + kept.eval] == [ids[1]], kept
    kept = curate(reqs, [], CurationSettings(), workers=1)
    assert [r["source"] for r in kept.train + kept.eval] == [ids[0]], kept


def test_settings_keys_are_the_dataset_kinds() -> None:
    """What the operator hands over (Dataset.spec.curation through the curation pod's --settings)
    has the keys of the curate module's settings, with the same defaults."""
    import json

    from kubeforge.api.dataset import DatasetSpec
    from kubeforge.controllers.dataset.manifests import curation_settings

    ours = CurationSettings().as_document()
    theirs = json.loads(curation_settings(DatasetSpec.model_validate({"source": {"inferenceServiceRef": {"name": "x"}}})))
    assert {k: set(v) for k, v in ours.items()} == {k: set(v) for k, v in theirs.items()}
    ours["redact"]["patterns"] = []
    assert CurationSettings.model_validate(theirs) == CurationSettings.model_validate(ours)
