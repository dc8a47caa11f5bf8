"""Scoring one model on SFT-shaped records (prompt or messages, and a reference target).

- **Log-likelihood** of each reference given its prompt, laid out exactly as the trainer lays
  out a sample (``data/sft.py``: bos + prompt + target + eos, the loss over the target and
  eos), so a fine-tune's falling loss and a rising ``mean_logprob`` are the same quantity.
- **Greedy answers** through the serving engine (``serve/engine.py``) with the prompt encoded
  as the server encodes it: what a user of the InferenceService would get at temperature 0.
- **Exact match and overlap** on short answers, after SQuAD's normalisation (case folded,
  punctuation and the articles a/an/the removed, whitespace collapsed); overlap is the token
  F1 of answer against reference.
- **Preference**: candidate and current answered the same prompt; the one whose answer
  overlaps the feedback-preferred target more wins. The judge is the users' own preferred
  text, not a second model: on a laptop there is no judge model to run, and the preferred
  text is exactly what the flywheel asks the candidate to learn.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from kubeforge.store.evaluation import PreferenceScore, SuiteScores

from kubeforge_runtime.data.sft import PromptEncoder, SFTRecord, build_sample
from kubeforge_runtime.evaluate.text import exact_match, is_short, overlap
from kubeforge_runtime.intmath import cdiv
from kubeforge_runtime.model.hf import eos_token_ids, load_hf
from kubeforge_runtime.model.llama import Llama
from kubeforge_runtime.serve.engine import EngineConfig, LLMEngine
from kubeforge_runtime.serve.sampling import SamplingParams
from kubeforge_runtime.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

_BLOCK = 16


@dataclasses.dataclass
class ScoredModel:
    """A model loaded for scoring, with what serving would pair it with."""

    model: Llama
    tokenizer: ByteTokenizer | HFTokenizer
    prompts: PromptEncoder
    eos_ids: frozenset[int]

    @classmethod
    def load(cls, directory: Path, device: torch.device) -> ScoredModel:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        tok = load_tokenizer(directory)
        return cls(load_hf(directory, device=device, dtype=dtype), tok, PromptEncoder(tok), eos_token_ids(directory))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_len(self) -> int:
        return self.model.cfg.max_position_embeddings

    def reference_logprobs(self, records: Sequence[SFTRecord], batch_size: int) -> list[tuple[float, int]]:
        """(sum of log-probabilities, tokens) of each record's target + eos given its prompt."""
        tok = self.tokenizer
        pairs = [(self.prompts.ids(r), tok.encode(r.target)) for r in records]
        out: list[tuple[float, int]] = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            # bos + prompt + target + eos, up to the model's context (build_sample cuts the rest)
            sample_len = min(self.max_len + 1, max(2 + len(p) + len(t) for p, t in chunk))
            samples = [build_sample(p, t, bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id, sample_len=sample_len)
                       for p, t in chunk]
            tokens = torch.tensor([s.tokens for s in samples], device=self.device)
            mask = torch.tensor([s.loss_mask for s in samples], device=self.device, dtype=torch.float32)
            with torch.inference_mode():
                logits = self.model(tokens[:, :-1]).float()
                logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
                sums = (logp * mask).sum(dim=1).tolist()
                counts = mask.sum(dim=1).tolist()
            out.extend((float(s), int(c)) for s, c in zip(sums, counts, strict=True))
        return out

    def greedy_answers(self, records: Sequence[SFTRecord], max_new_tokens: int, batch_size: int) -> list[str]:
        """Each record's answer at temperature 0, through the serving engine. A prompt too long
        for the context keeps its end (and bos), as training cuts it."""
        max_new_tokens = min(max_new_tokens, self.max_len - 1)
        room = self.max_len - max_new_tokens
        engine = LLMEngine(self.model, self.tokenizer, EngineConfig(
            block_size=_BLOCK, num_blocks=batch_size * cdiv(self.max_len, _BLOCK) + 1, max_num_seqs=batch_size,
            max_num_batched_tokens=max(512, self.max_len)), eos_token_ids=self.eos_ids)
        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        texts = [""] * len(records)
        for i, rec in enumerate(records):
            ids = self.prompts.ids(rec) or [self.tokenizer.bos_id]
            if len(ids) > room:
                ids = ids[:1] + ids[len(ids) - room + 1:] if ids[0] == self.tokenizer.bos_id else ids[-room:]
            engine.add_request(str(i), ids, params)
        while engine.has_unfinished_requests():
            for o in engine.step():
                texts[int(o.request_id)] += o.delta_text
        return texts


def suite_scores(logprobs: Sequence[tuple[float, int]], answers: Sequence[str], records: Sequence[SFTRecord],
                 short_answer_words: int) -> SuiteScores:
    total = sum(s for s, _ in logprobs)
    tokens = sum(n for _, n in logprobs)
    mean = total / tokens if tokens else None
    short = [(a, r.target) for a, r in zip(answers, records, strict=True) if is_short(r.target, short_answer_words)]
    return SuiteScores(
        records=len(records), tokens=tokens, mean_logprob=mean,
        perplexity=None if mean is None else math.exp(min(-mean, 700.0)),
        short_answers=len(short),
        exact_match=sum(exact_match(a, ref) for a, ref in short) / len(short) if short else None,
        overlap=sum(overlap(a, ref) for a, ref in short) / len(short) if short else None)


def preference(candidate: Sequence[str], baseline: Sequence[str], preferred: Sequence[str],
               tie_margin: float) -> PreferenceScore:
    """Win/tie/loss of the candidate's answers against the baseline's, judged by overlap with
    the preferred target of the same prompt."""
    wins = losses = 0
    for c, b, p in zip(candidate, baseline, preferred, strict=True):
        d = overlap(c, p) - overlap(b, p)
        if d > tie_margin:
            wins += 1
        elif d < -tie_margin:
            losses += 1
    pairs = len(preferred)
    ties = pairs - wins - losses
    return PreferenceScore(pairs=pairs, wins=wins, losses=losses, ties=ties, tie_margin=tie_margin,
                           score=(wins + ties / 2) / pairs if pairs else None)
