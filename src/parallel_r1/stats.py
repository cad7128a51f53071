"""The statistics the run and the study report: standard errors over seeds and over problems clustered by the
computation that solves them, and the difference of two arms with both sources of noise.

Pure functions on plain numbers; nothing here reads files.

An arm's score is a table ``scores[seed][problem]`` (the share of a problem's k samples that are correct, for
the model trained with that seed). Two kinds of noise move a difference between two arms:

* the seeds (SFT and RL together when every seed trains its own SFT): the spread of the per-seed means;
* the problems: a held-out set is a sample of problems, and problems that share a solving computation (the
  search task's ``n*f+o`` with the same answer) are not independent, so their standard error is clustered by
  that computation (the sum of residuals within a cluster enters squared).

`arm_difference` adds the two variances. With few seeds a ratio of two standard errors is a loose test;
`t_critical` gives the two-sided 95 % threshold of Student's t for the seeds' degrees of freedom, and the
report says whether a difference clears it too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

# Two-sided 95 % quantiles of Student's t (0.975 one-sided) for 1..30 degrees of freedom.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of `values`: sample standard deviation / sqrt(n) (0 for fewer than two)."""
    n = len(values)
    if n < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean)."""
    return mean(values), standard_error(values)


def t_critical(df: int) -> float:
    """Two-sided 95 % threshold of Student's t with `df` degrees of freedom (the normal 1.96 above 30)."""
    if df < 1:
        return math.inf
    return _T975[df - 1] if df <= len(_T975) else 1.96


def clustered_se(values: Mapping[str, float], cluster_of: Mapping[str, str]) -> float:
    """Standard error of the mean of `values` (unit -> value) with units grouped into clusters: the
    sandwich estimator sqrt(C / (C - 1) * sum_c (sum of residuals in c)^2) / n, C clusters, n units.
    With one unit per cluster it equals `standard_error` but for the factor (n-1)/n inside the root."""
    n = len(values)
    if n < 2:
        return 0.0
    m = sum(values.values()) / n
    sums: dict[str, float] = {}
    for unit, value in values.items():
        key = cluster_of.get(unit, unit)
        sums[key] = sums.get(key, 0.0) + value - m
    c = len(sums)
    if c < 2:
        return 0.0
    return math.sqrt(c / (c - 1) * sum(s * s for s in sums.values())) / n


def seed_means(scores: Mapping[str, Mapping[str, float]], problems: Sequence[str]) -> list[float]:
    """Per seed, the mean score over `problems`."""
    return [mean([by_problem[p] for p in problems]) for by_problem in scores.values()]


def problem_means(scores: Mapping[str, Mapping[str, float]], problems: Sequence[str]) -> dict[str, float]:
    """Per problem, the mean score over seeds."""
    return {p: mean([by_problem[p] for by_problem in scores.values()]) for p in problems}


def arm_summary(scores: Mapping[str, Mapping[str, float]], cluster_of: Mapping[str, str]) -> dict:
    """Mean accuracy of one arm over seeds and problems, with its seed, cluster and combined standard errors."""
    problems = sorted(set.intersection(*(set(s) for s in scores.values())))
    per_seed = seed_means(scores, problems)
    se_seeds = standard_error(per_seed)
    se_problems = clustered_se(problem_means(scores, problems), cluster_of)
    return {
        "mean": mean(per_seed),
        "se": math.hypot(se_seeds, se_problems),
        "se_seeds": se_seeds,
        "se_problems": se_problems,
        "seeds": len(per_seed),
        "values": per_seed,
    }


def arm_difference(
    a: Mapping[str, Mapping[str, float]], b: Mapping[str, Mapping[str, float]], cluster_of: Mapping[str, str]
) -> dict:
    """Mean of arm `a` minus arm `b` on their shared problems (paired over problems, not over seeds).

    se_seeds: the two arms' per-seed means as independent samples; se_problems: the per-problem difference
    (averaged over seeds) clustered by computation; se: both combined. `t` is diff / se, `df` the seeds'
    degrees of freedom ((S_a - 1) + (S_b - 1)); `significant`: |diff| > 2 se; `t_significant`: |t| clears
    Student's two-sided 95 % threshold for `df`."""
    shared = sorted(set.intersection(*(set(s) for s in [*a.values(), *b.values()])))
    if len(shared) < 2:
        raise ValueError("two arms need at least two shared problems to be compared")
    ma, mb = seed_means(a, shared), seed_means(b, shared)
    pa, pb = problem_means(a, shared), problem_means(b, shared)
    diffs = {p: pa[p] - pb[p] for p in shared}
    diff = mean(ma) - mean(mb)
    se_seeds = math.hypot(standard_error(ma), standard_error(mb))
    se_problems = clustered_se(diffs, cluster_of)
    se = math.hypot(se_seeds, se_problems)
    df = max(len(ma) - 1, 0) + max(len(mb) - 1, 0)
    t = diff / se if se > 0 else 0.0
    return {
        "diff": diff,
        "se": se,
        "se_seeds": se_seeds,
        "se_problems": se_problems,
        "problems": len(shared),
        "clusters": len({cluster_of.get(p, p) for p in shared}),
        "t": t,
        "df": df,
        "t_threshold": t_critical(df) if df else None,
        "significant": bool(se > 0 and abs(diff) > 2 * se),
        "t_significant": bool(df and se > 0 and abs(t) > t_critical(df)),
    }


def gain_difference(
    a_before: Sequence[float], a_after: Sequence[float], b_before: Sequence[float], b_after: Sequence[float]
) -> dict:
    """RL gain of arm a minus RL gain of arm b, each gain paired by seed (after - before of the same seed's
    SFT model), with the standard error of the per-seed gains."""
    ga = [y - x for x, y in zip(a_before, a_after)]
    gb = [y - x for x, y in zip(b_before, b_after)]
    (gain_a, se_a), (gain_b, se_b) = mean_se(ga), mean_se(gb)
    se = math.hypot(se_a, se_b)
    diff = gain_a - gain_b
    df = max(len(ga) - 1, 0) + max(len(gb) - 1, 0)
    return {
        "gain_a": gain_a,
        "se_a": se_a,
        "gain_b": gain_b,
        "se_b": se_b,
        "diff": diff,
        "se": se,
        "df": df,
        "significant": bool(se > 0 and abs(diff) > 2 * se),
        "t_significant": bool(df and se > 0 and abs(diff / se) > t_critical(df)),
    }


def paired_difference(a: Mapping[str, float], b: Mapping[str, float]) -> dict:
    """Mean over seeds of a[seed] - b[seed] on the seeds both have, with the standard error of the per-seed
    differences (arms that start from the same seed's SFT model, as the reward-schedule arms do, are paired by
    seed: their shared cold start cancels). `df` = seeds - 1; `significant` and `t_significant` as in
    `arm_difference`."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        raise ValueError("a paired difference needs at least one seed both arms have")
    diff, se = mean_se(diffs)
    df = len(diffs) - 1
    return {
        "diff": diff,
        "se": se,
        "df": df,
        "seeds": len(diffs),
        "values": diffs,
        "significant": bool(se > 0 and abs(diff) > 2 * se),
        "t_significant": bool(df and se > 0 and abs(diff / se) > t_critical(df)),
    }
