"""The counter-based sampler: its uniforms are splitmix64 of the counters, and its draws follow the softmax."""

import torch

from parallel_r1.rollout import SamplingParams
from parallel_r1.sampler import counter_uniforms, sample_tokens, uniforms_for


def _splitmix64(z: int) -> int:
    mask = (1 << 64) - 1
    z = (z + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_counter_uniforms_are_splitmix64_of_the_counters():
    rows = [[0, 0, 0], [7, 3, 1], [2**62 + 5, 12345, 99], [-1, 2**63 - 1, 0]]
    expected = []
    for row in rows:
        h = 0
        for value in row:
            h = _splitmix64(h ^ (value & ((1 << 64) - 1)))
        expected.append((h >> 11) * 2.0**-53)
    assert counter_uniforms(torch.tensor(rows)).tolist() == expected
    assert uniforms_for([tuple(r) for r in rows], torch.device("cpu")).tolist() == expected
    many = [(3, i, i % 7, 2**63 + i, 1, i * 31) for i in range(100)]  # > 64 rows: the torch path
    assert uniforms_for(many, torch.device("cpu")).tolist() == uniforms_for(many[:50], torch.device("cpu")).tolist() + (
        uniforms_for(many[50:], torch.device("cpu")).tolist()
    )


def test_counter_sampler_follows_the_softmax_distribution():
    """Inverse-CDF draws with hashed uniforms: chi-square of the frequencies against softmax(logits / T),
    and banned or top-k-cut tokens never drawn."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    draws = 40_000
    counters = torch.stack([torch.full((draws,), 3), torch.arange(draws), torch.zeros(draws, dtype=torch.long)], 1)
    noise = counter_uniforms(counters)
    params = SamplingParams(temperature=0.7)
    tokens, logprobs, removed = sample_tokens(
        logits.expand(draws, -1), torch.zeros(draws, 6, dtype=torch.bool), params, noise
    )
    probs = torch.softmax(logits / 0.7, -1)
    counts = torch.bincount(tokens, minlength=6).double()
    chi2 = (((counts - draws * probs) ** 2) / (draws * probs)).sum().item()
    assert chi2 < 20.5  # 5 degrees of freedom, p = 0.001
    assert torch.allclose(logprobs, probs.log()[tokens], atol=1e-6)
    assert torch.all(removed.abs() < 1e-6)  # nothing banned, no top-k/top-p
    banned = torch.zeros(draws, 6, dtype=torch.bool)
    banned[:, 0] = True
    tokens, _, removed = sample_tokens(logits.expand(draws, -1), banned, SamplingParams(top_k=2), noise)
    counts = torch.bincount(tokens, minlength=6)
    assert counts[[0, 2, 3, 4]].sum() == 0  # banned, or outside the top 2 of what is left
    kept = torch.softmax(logits[[1, 5]], -1)
    assert torch.allclose(removed, 1 - torch.softmax(logits, -1)[[1, 5]].sum(), atol=1e-6)
    _, behaviour, _ = sample_tokens(logits.expand(draws, -1), banned, SamplingParams(top_k=2), noise, behaviour=True)
    assert torch.allclose(behaviour, kept.log()[(tokens == 5).long()], atol=1e-6)
    assert abs(counts[1].item() / draws - kept[0].item()) < 0.01
