"""Sampling parameters and the sampler.

Greedy rows are one batched ``argmax``; sampled rows each draw with their own generator so a
request with a ``seed`` gets the same tokens whatever else shares its batch (the point of a
seed in a continuously batched server).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

log = logging.getLogger(__name__)

#: Temperatures below this sample greedily (vLLM's ``_SAMPLING_EPS``).
GREEDY_TEMPERATURE = 1e-5


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What a request asks of generation; validated by the HTTP layer before it gets here."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    #: 0 or -1 disables top-k
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must not be negative")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        # below GREEDY_TEMPERATURE, logits / temperature overflows to inf (and a subnormal
        # one is a valid JSON number): the limit of sampling there is argmax, as in vLLM
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-request generator when the request is seeded, else None (the global RNG)."""
    if params.greedy or params.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed & 0xFFFF_FFFF_FFFF_FFFF)  # any int64, and seed + choice index
    return g


def _sample_row(logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    logits = logits_V.float() / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p; the first always stays,
        # also when top_p rounds to 0 in float32 (a top_p of 1e-308 passes validation)
        drop = probs.cumsum(-1) - probs >= params.top_p
        drop[0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = logits.softmax(-1)
    if not bool(torch.isfinite(probs).all()):
        # never fail the whole step for one row: a request's parameters (or non-finite logits)
        # must not abort the batch, nor count toward breaking the engine
        log.warning("sampling: non-finite probabilities for %s; taking the argmax", params)
        return int(torch.nan_to_num(logits_V.float(), nan=float("-inf")).argmax().item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sample(logits_BV: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """One next token per row."""
    greedy_ids = logits_BV.argmax(-1).tolist()
    out: list[int] = []
    for i, p in enumerate(params):
        out.append(int(greedy_ids[i]) if p.greedy else _sample_row(logits_BV[i], p, generators[i]))
    return out
