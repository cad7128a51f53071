"""The rollout sampler: counter-based uniforms and inverse-CDF sampling from the warped logits.

A token's uniform is a hash of its counters (seed, the sample's key, sample index, its stream, its index in
the stream): splitmix64 chained over the counters, in int64 torch arithmetic (multiplication wraps modulo
2**64) or, for a few rows, in Python integers, bit for bit the same. So a sample does not depend on which
other samples share its batch (docs/engine.md, "Sampling").
"""

from __future__ import annotations

import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from parallel_r1.rollout import SamplingParams


def _int64(value: int) -> int:
    """`value` modulo 2**64 as a signed 64-bit integer."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _int64(0x9E3779B97F4A7C15), _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    z = z + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def counter_uniforms(counters: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) (float64, 53 random bits) [M] from integer counters [M, F]: splitmix64 chained over
    the F fields, so each uniform is a pure function of its row of counters."""
    counters = counters.to(torch.int64)
    h = torch.zeros(counters.shape[0], dtype=torch.int64, device=counters.device)
    for f in range(counters.shape[1]):
        h = _splitmix64(h ^ counters[:, f])
    return _shift_right(h, 11).double() * 2.0**-53


_MASK64 = (1 << 64) - 1


def _splitmix64_int(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def uniforms_for(counters: list[tuple[int, ...]], device: torch.device) -> torch.Tensor:
    """`counter_uniforms` of a few rows of counters, computed with Python integers where that is faster
    (the two give the same numbers bit for bit)."""
    if len(counters) > 64:
        return counter_uniforms(torch.tensor([[_int64(c) for c in row] for row in counters], device=device))
    values = []
    for row in counters:
        h = 0
        for c in row:
            h = _splitmix64_int(h ^ (c & _MASK64))
        values.append((h >> 11) * 2.0**-53)
    return torch.tensor(values, dtype=torch.float64, device=device)


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row of probs [M, V], the first token whose cumulative probability exceeds u * total (u [M] in
    [0, 1)); tokens of probability 0 are never drawn."""
    cdf = probs.double().cumsum(-1)
    target = uniforms.to(cdf)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)


def warp_scores(scaled: torch.Tensor, banned: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The scores the sampler draws from: temperature-scaled logits [M, V] with the `banned` [M, V] tokens at
    -inf, then top-k and top-p. The trainer replays exactly this (`bans.Behaviour`), so both sides
    refer to the same behaviour policy."""
    scores = scaled.masked_fill(banned, float("-inf"))
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores


def sample_tokens(
    logits: torch.Tensor,
    banned: torch.Tensor,
    params: SamplingParams,
    noise: torch.Tensor | torch.Generator | None = None,
    behaviour: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one token per row of logits [M, V] with tags `banned` [M, V] masked out.

    Inverse-CDF sampling from softmax(`warp_scores`(logits / T)) with the uniforms `noise` ([M] in [0, 1),
    e.g. `counter_uniforms`), or uniforms drawn from a `torch.Generator`, or fresh ones (None). Returns
    (tokens [M], logprobs [M], removed [M]). With `behaviour` the log-prob is under the distribution sampled
    from (bans, top-k and top-p applied, renormalised); otherwise under softmax(logits / T) of the full
    vocabulary. `removed` is the probability mass of softmax(logits / T) that the bans, top-k and top-p
    took away: the gap between those two distributions. Greedy decoding (temperature 0) records the
    full-vocabulary log-prob with T = 1 and the mass the bans alone remove.
    """
    # float64 logits stay float64, so that a float64 run of engine and trainer can be compared to 1e-9
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    greedy = params.temperature == 0
    scaled = logits / (1.0 if greedy else params.temperature)
    if greedy:
        scores = scaled.masked_fill(banned, float("-inf"))
        tokens = scores.argmax(dim=-1)
    else:
        scores = warp_scores(scaled, banned, params.top_k, params.top_p)
        if not isinstance(noise, torch.Tensor):
            noise = torch.rand(scores.shape[0], generator=noise, dtype=torch.float64, device=scores.device)
        tokens = inverse_cdf(torch.softmax(scores, dim=-1), noise)
    full_lse, kept_lse = scaled.logsumexp(-1), scores.logsumexp(-1)
    # summed over the removed tokens, not 1 - kept: that difference of two lse's loses ~1e-6 to rounding
    removed = (scaled.masked_fill(~torch.isneginf(scores), float("-inf")).logsumexp(-1) - full_lse).exp()
    if behaviour and not greedy:
        logprobs = scores.gather(1, tokens[:, None])[:, 0] - kept_lse
    else:
        logprobs = scaled.gather(1, tokens[:, None])[:, 0] - full_lse
    return tokens, logprobs, removed
