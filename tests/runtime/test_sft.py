"""SFT data: samples and their loss mask, the resumable cursor, the loss normaliser, a tiny
training run on curated records, and the drift baseline an export carries."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
from kubeforge.store.flywheel import BASELINE_PROFILE_NAME, Profile
from kubeforge_runtime.data import (
    BUILTIN_CORPUS,
    BatchLoader,
    DataState,
    PromptEncoder,
    SFTRecord,
    SFTStream,
    SourceFile,
    build_sample,
    list_files,
)
from kubeforge_runtime.data.profile import baseline_profile
from kubeforge_runtime.data.sources import read_pieces
from kubeforge_runtime.model.llama import Llama
from kubeforge_runtime.model.shape import preset
from kubeforge_runtime.tokenizer import ByteTokenizer
from kubeforge_runtime.train.loop import token_loss_sum

from tests.runtime.test_trainer import job_env, losses, run_trainer, write_config

pytestmark = pytest.mark.runtime
TOK = ByteTokenizer()
NAMES = ["Ada", "Boris", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kira", "Lars"]


def sft_records(n: int) -> list[dict[str, Any]]:
    """Learnable pairs: the target repeats the prompt's name in a fixed frame."""
    out = []
    for i in range(n):
        name = NAMES[i % len(NAMES)]
        if i % 3 == 0:
            out.append({"id": f"r{i}", "prompt": None, "messages": [{"role": "user", "content": f"greet {name}"}],
                        "target": f"Hello, {name}!", "source": f"r{i}", "rating": None, "corrected": False})
        else:
            out.append({"id": f"r{i}", "prompt": f"Name: {name}. Greet them.", "messages": None,
                        "target": f"Hello, {name}!", "source": f"r{i}", "rating": 1, "corrected": False})
    return out


def write_sft_tar(path: Path, records: list[dict[str, Any]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for r in records:
            data = json.dumps(r).encode()
            info = tarfile.TarInfo(f"{r['id']}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_only_target_tokens_and_eos_carry_loss_weight() -> None:
    prompt, target = TOK.encode("Q: hi"), TOK.encode("ok!")
    s = build_sample(prompt, target, bos=TOK.bos_id, eos=TOK.eos_id, pad=TOK.pad_id, sample_len=17)
    assert s.tokens == [TOK.bos_id, *prompt, *target, TOK.eos_id] + [TOK.pad_id] * 7
    assert len(s.loss_mask) == 16
    # the input at j predicts tokens[j + 1]: weight exactly on the target and its eos
    weighted = [s.tokens[j + 1] for j, m in enumerate(s.loss_mask) if m]
    assert weighted == [*target, TOK.eos_id]
    assert all(m == 0 for j, m in enumerate(s.loss_mask) if j + 1 <= len(prompt))  # prompt positions


def test_a_long_sample_keeps_the_target_start_and_cuts_the_prompt_from_the_left() -> None:
    kw = dict(bos=TOK.bos_id, eos=TOK.eos_id, pad=TOK.pad_id, sample_len=21)
    prompt, target = list(range(30)), [100, 101, 102, 103]
    s = build_sample(prompt, target, **kw)  # type: ignore[arg-type]
    assert s.tokens == [TOK.bos_id, *prompt[-15:], *target, TOK.eos_id] and sum(s.loss_mask) == 5
    s = build_sample([TOK.bos_id, 1, 2], list(range(100, 140)), **kw)  # type: ignore[arg-type]
    assert s.tokens == [TOK.bos_id, 1, 2, *range(100, 118)]  # bos not doubled; target cut at its end
    s = build_sample(prompt, list(range(100, 140)), **kw)  # type: ignore[arg-type]
    assert s.tokens == [TOK.bos_id, *prompt[-10:], *range(100, 110)]  # both long: half the window each
    assert s.loss_mask == [0] * 10 + [1] * 10


def test_chat_prompts_render_as_the_server_renders_them() -> None:
    from kubeforge_runtime.serve.api import ChatTemplate

    rec = SFTRecord(None, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], "yo")
    enc = PromptEncoder(TOK)
    text = enc.text(rec)
    assert text == ChatTemplate(TOK).render(rec.messages or [], True) == "<s>system: be brief</s>\nuser: hi</s>\nassistant: "
    ids = enc.ids(rec)
    stream = SFTStream([SourceFile("unused.jsonl", "sft")], TOK, 65, 0, False, DataState())
    sample = stream.sample(rec)
    assert sample.tokens[:len(ids)] == ids and ids.count(TOK.bos_id) == 1  # the template's bos, not doubled
    # the profile counts a chat as the server does: its contents, one per line, no template
    assert enc.profile_ids(rec) == TOK.encode("be brief\nhi")


def _first(stream: SFTStream, n: int) -> list[tuple[list[int], list[int], DataState]]:
    out = []
    for s, st in stream:
        out.append((s.tokens, s.loss_mask, st))
        if len(out) == n:
            return out
    raise AssertionError("stream ended")


def test_resume_from_any_state_neither_repeats_nor_skips(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    write_sft_tar(tmp_path / "d" / "a.tar", sft_records(7))
    (tmp_path / "d" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in sft_records(12)[7:]) + "\n\n")
    write_sft_tar(tmp_path / "d" / "eval.tar", sft_records(3))  # a version's eval split: not trained on
    (tmp_path / "d" / "manifest.json").write_text("{}")
    files = list_files([str(tmp_path / "d")], "sft")
    assert [Path(f.uri).name for f in files] == ["a.tar", "b.jsonl"]

    def stream(state: DataState) -> SFTStream:
        return SFTStream(files, TOK, 49, 4, True, state)

    reference = _first(stream(DataState()), 30)  # 12 records a epoch: over two epochs
    assert [st.sample for *_, st in reference] == list(range(1, 31)) and reference[-1][2].epoch == 2
    assert all(st.offset == 0 for *_, st in reference)
    firsts = {tuple(t) for t, _, st in reference if st.epoch == 0}
    assert len(firsts) == 12  # every record once per epoch
    for k in (0, 1, 6, 11, 12, 20):
        resumed = _first(stream(reference[k][2]), 30 - k - 1)
        assert [(t, m) for t, m, _ in resumed] == [(t, m) for t, m, _ in reference[k + 1:]], k


def test_batches_carry_the_global_loss_token_count_whatever_the_world_size(tmp_path: Path) -> None:
    write_sft_tar(tmp_path / "a.tar", sft_records(20))
    files = list_files([str(tmp_path / "a.tar")], "sft")
    global_masks = []
    for world in (1, 2, 3):
        loaders = [BatchLoader(SFTStream(files, TOK, 49, 0, False, DataState()), global_batch=6, micro_batch=2,
                               rank=r, world_size=world, prefetch=1) for r in range(world)]
        steps = [next(ld) for ld in loaders]
        for ld in loaders:
            ld.close()
        assert len({b.loss_tokens for b in steps}) == 1
        real = sum(float(mb.loss_mask.sum()) for b in steps for mb in b.micro_batches if mb.weight
                   and mb.loss_mask is not None)
        assert real == steps[0].loss_tokens
        global_masks.append(steps[0].loss_tokens)
    assert len(set(global_masks)) == 1 and global_masks[0] > 6


def test_the_masked_loss_and_its_gradient_do_not_depend_on_world_size_or_micro_batches(tmp_path: Path) -> None:
    """The loop's rule: each rank backpropagates its loss sum * world / global loss tokens, and
    data parallelism averages the gradients over ranks."""
    recs = sft_records(8)
    recs[1]["target"] = "a much longer answer than the others have " * 2  # unequal target lengths
    write_sft_tar(tmp_path / "a.tar", recs)
    files = list_files([str(tmp_path / "a.tar")], "sft")
    model = Llama(preset("tiny", vocab_size=TOK.vocab_size))
    model.init_weights(0)

    def step(world: int, micro: int) -> tuple[float, list[torch.Tensor]]:
        grads: list[torch.Tensor] = [torch.zeros_like(p) for p in model.parameters()]
        total = 0.0
        for r in range(world):
            loader = BatchLoader(SFTStream(files, TOK, 97, 0, False, DataState()), global_batch=8, micro_batch=micro,
                                 rank=r, world_size=world, prefetch=1)
            batch = next(loader)
            loader.close()
            model.zero_grad()
            for mb in batch.micro_batches:
                logits = model(mb.tokens[:, :-1])
                loss_sum = token_loss_sum(logits, mb.tokens[:, 1:], mb.loss_mask) * mb.weight
                (loss_sum * world / batch.loss_tokens).backward()
                total += float(loss_sum.detach()) / batch.loss_tokens
            for g, p in zip(grads, model.parameters(), strict=True):
                g += p.grad / world  # the all-reduce average
        return total, grads

    loss_1, grads_1 = step(1, 8)
    # the plain definition: mean cross-entropy over the target tokens of the whole batch
    samples = [s for (s, _), _ in zip(SFTStream(files, TOK, 97, 0, False, DataState()), range(8), strict=False)]
    tokens = torch.tensor([s.tokens for s in samples])
    mask = torch.tensor([s.loss_mask for s in samples], dtype=torch.float32)
    with torch.no_grad():
        per = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, TOK.vocab_size),
                                                tokens[:, 1:].reshape(-1), reduction="none")
    assert loss_1 == pytest.approx(float((per * mask.reshape(-1)).sum() / mask.sum()), rel=1e-5)
    for world, micro in ((2, 1), (3, 2), (4, 2)):
        loss_w, grads_w = step(world, micro)
        assert loss_w == pytest.approx(loss_1, rel=1e-5)
        for a, b in zip(grads_1, grads_w, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sft_training_learns_the_targets_the_same_on_two_ranks_and_exports_its_baseline(tmp_path: Path) -> None:
    data = write_sft_tar(tmp_path / "train.tar", sft_records(96))
    out = tmp_path / "export"
    cfg = write_config(tmp_path / "c.yaml", data={"paths": [str(data)], "format": "sft", "seq_len": 64},
                       train={"steps": 24}, schedule={"kind": "constant"}, export={"enabled": True, "path": str(out)})
    rc, two = run_trainer(tmp_path, "two", cfg, 2, job_env(), timeout=240)
    assert rc == 0, two.log.read_text()[-3000:]
    la = losses(two)
    assert sorted(la) == list(range(1, 25))
    assert la[24] < la[1] - 2.0 and la[24] < 1.5, la  # the loss is on the targets only: they are learnable
    cfg1 = write_config(tmp_path / "c1.yaml", data={"paths": [str(data)], "format": "sft", "seq_len": 64},
                        train={"steps": 6}, schedule={"kind": "constant"})
    rc, one = run_trainer(tmp_path, "one", cfg1, None, job_env(), timeout=240)
    assert rc == 0, one.log.read_text()[-3000:]
    for step, loss in losses(one).items():
        assert loss == pytest.approx(la[step], abs=2e-4), step  # normalised by the global target tokens

    marker = json.loads((out / "commit.json").read_text())
    assert BASELINE_PROFILE_NAME in marker["files"]  # written before the marker: part of the export
    profile = Profile.model_validate_json((out / BASELINE_PROFILE_NAME).read_bytes())
    expected = Profile()
    enc = PromptEncoder(TOK)
    for r in sft_records(96):
        expected.add(enc.profile_ids(SFTRecord(r["prompt"], r["messages"], r["target"])))
    assert profile.prompts == 96
    assert (profile.prompt_length, profile.token_frequency) == (expected.prompt_length, expected.token_frequency)


def test_a_text_baseline_counts_the_first_5000_non_empty_lines_in_training_order(tmp_path: Path) -> None:
    files = list_files([BUILTIN_CORPUS])
    profile = baseline_profile(files, TOK, seed=3, shuffle=True)
    from kubeforge_runtime.data.loader import file_order

    expected = Profile()
    for i in file_order(len(files), 3, 0, True):
        for piece in read_pieces(files[i]):
            for line in piece.text.split("\n"):
                if line.strip() and expected.prompts < 5000:
                    expected.add(TOK.encode(line))
    assert expected.prompts > 100 and profile.prompts == expected.prompts
    assert profile.prompt_length == expected.prompt_length and profile.token_frequency == expected.token_frequency
    small = tmp_path / "small.txt"
    small.write_text("\n".join(f"line {i}" for i in range(6000)) + "\n\n")
    assert baseline_profile(list_files([str(small)]), TOK).prompts == 5000


def test_an_sft_config_without_records_is_a_configuration_error(tmp_path: Path) -> None:
    from kubeforge.api.contract import ExitCode

    write_sft_tar(tmp_path / "empty.tar", [])
    cfg = write_config(tmp_path / "c.yaml", data={"paths": [str(tmp_path / "empty.tar")], "format": "sft"})
    rc, run = run_trainer(tmp_path, "empty", cfg, None, job_env())
    assert rc == ExitCode.CONFIG_ERROR and "no SFT records" in run.log.read_text()
