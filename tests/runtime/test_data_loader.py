"""Packing, rank slicing and the resumable global sample cursor."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from kubeforge_runtime.data import BUILTIN_CORPUS, BatchLoader, DataState, TokenStream, list_files, rank_plan
from kubeforge_runtime.data.sources import read_pieces
from kubeforge_runtime.tokenizer import ByteTokenizer

pytestmark = pytest.mark.runtime
TOK = ByteTokenizer()


def _stream(files: list, state: DataState = DataState(), sample_len: int = 33, seed: int = 0) -> TokenStream:
    return TokenStream(files, TOK, sample_len, seed, True, "text", state)


def _first(stream: TokenStream, n: int) -> list[tuple[list[int], DataState]]:
    out = []
    for item in stream:
        out.append(item)
        if len(out) == n:
            return out
    raise AssertionError("stream ended")


def _write_small_corpus(tmp: Path) -> list:
    (tmp / "a.txt").write_text("alpha beta gamma\n" * 7)
    (tmp / "b.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " * (i + 1)}) for i in range(5)) + "\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, ext, payload in [("s0", "txt", b"tar text zero"), ("s1", "json", json.dumps({"text": "tar json"}).encode()),
                                  ("s1", "jpg", b"\xff\xd8 not text")]:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (tmp / "c.tar").write_bytes(buf.getvalue())
    (tmp / "README").write_text("not data")
    return list_files([str(tmp)])


def test_sources_read_text_jsonl_and_tar(tmp_path: Path) -> None:
    files = _write_small_corpus(tmp_path)
    assert [(Path(f.uri).name, f.format) for f in files] == [("a.txt", "text"), ("b.jsonl", "jsonl"), ("c.tar", "tar")]
    texts = {Path(f.uri).name: [p.text for p in read_pieces(f)] for f in files}
    assert texts["a.txt"] == ["alpha beta gamma\n" * 7]
    assert texts["b.jsonl"][2] == "doc 2 doc 2 doc 2 "
    assert texts["c.tar"] == ["tar text zero", "tar json"]
    with pytest.raises(ValueError, match="no input files"):
        list_files([str(tmp_path / "nothing-*.txt")])


def test_stream_packs_documents_with_bos_eos_and_never_pads(tmp_path: Path) -> None:
    files = _write_small_corpus(tmp_path)
    samples = _first(_stream(files), 40)  # more than one epoch
    assert all(len(s) == 33 for s, _ in samples)
    flat = [t for s, _ in samples for t in s]
    assert flat.count(TOK.bos_id) >= 8 and TOK.pad_id not in flat
    assert samples[-1][1].epoch >= 1 and [st.sample for _, st in samples] == list(range(1, 41))


def test_resume_from_any_state_continues_the_same_stream(tmp_path: Path) -> None:
    files = _write_small_corpus(tmp_path)
    reference = _first(_stream(files), 30)
    for k in (0, 1, 7, 12, 28):
        state = reference[k][1]
        resumed = _first(_stream(files, state), 30 - k - 1)
        assert [s for s, _ in resumed] == [s for s, _ in reference[k + 1:]], f"resume after sample {k}"


def test_builtin_corpus_is_shuffled_per_epoch_from_seed() -> None:
    files = list_files([BUILTIN_CORPUS])
    assert len(files) >= 4
    a = _first(_stream(files, seed=1, sample_len=65), 3)
    b = _first(_stream(files, seed=2, sample_len=65), 3)
    assert a[0][1].file == 0 and [s for s, _ in a] != [s for s, _ in b]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_ranks_cover_the_global_batch_exactly_once(world: int) -> None:
    seen: list[int] = []
    n_micro = set()
    for r in range(world):
        mine, n = rank_plan(8, 2, r, world)
        seen += mine
        n_micro.add(n)
    assert sorted(seen) == list(range(8)) and len(n_micro) == 1


def test_global_batches_do_not_depend_on_world_size_and_resume_across_sizes(tmp_path: Path) -> None:
    files = _write_small_corpus(tmp_path)

    def steps(world: int, state: DataState, n: int) -> list[tuple[list[list[int]], DataState]]:
        loaders = [BatchLoader(_stream(files, state), global_batch=6, micro_batch=2, rank=r, world_size=world,
                               prefetch=2) for r in range(world)]
        out = []
        for _ in range(n):
            per_rank = [next(ld) for ld in loaders]
            assert len({len(b.micro_batches) for b in per_rank}) == 1  # collectives stay matched
            rows: dict[int, list[int]] = {}
            for r, b in enumerate(per_rank):
                real = [row for mb in b.micro_batches if mb.weight for row in mb.tokens.tolist()]
                assert len(real) == b.samples
                for j, row in zip(rank_plan(6, 2, r, world)[0], real, strict=True):
                    rows[j] = row
            out.append(([rows[j] for j in range(6)], per_rank[0].state_after))
        for ld in loaders:
            ld.close()
        return out

    two = steps(2, DataState(), 4)
    assert [b for b, _ in steps(1, DataState(), 4)] == [b for b, _ in two]
    assert [b for b, _ in steps(4, DataState(), 4)] == [b for b, _ in two]  # 6 % 4 != 0: filler micro-batches
    resumed = steps(3, two[1][1], 2)  # saved after step 2 at world 2, resumed at world 3
    assert [b for b, _ in resumed] == [b for b, _ in two[2:]]
    assert resumed[-1][1].sample == 24
