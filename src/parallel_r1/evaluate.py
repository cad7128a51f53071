"""Evaluation: sample k responses per benchmark problem with the rollout engine and report
mean@k, pass@k' (unbiased estimator), maj@k, the parallel ratio, blocks per response, response and path
lengths and throughput.

The metric functions at the top are pure; `evaluate_benchmark` runs one model on one benchmark and
`run_eval` drives several models over several benchmarks, writing a JSON summary and one JSONL line per
sample (the same record shape the GRPO trainer logs, so `viewer` and `analysis` read both).

Prompts go through `prompts.PromptFormat`: the chat template when the model's tokenizer has one (unless
`EvalConfig.chat_template` says otherwise), and `EvalConfig.shots` worked examples drawn from a training
split (`shot_pool`), never from the problems evaluated.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from math import comb
from pathlib import Path

from rich.progress import Progress

from parallel_r1.answers import verify
from parallel_r1.backends import make_engine
from parallel_r1.data import Problem, load_problems
from parallel_r1.files import atomic_write_text
from parallel_r1.models import PRESETS, load_model_and_tokenizer, save_model
from parallel_r1.prompts import PROMPT_TEMPLATE, SHOT_STOP, Shot, draw_shots, prompt_format
from parallel_r1.rewards import score_response
from parallel_r1.rollout import rollout_record, sampling_params, upgrade_record
from parallel_r1.settings import EvalConfig, InputError

log = logging.getLogger(__name__)

# File stems tried, in order, for a benchmark name under --data-dir. The full MATH test set stands in
# for MATH-500 only when no MATH-500 file is there (a warning says so: use --limit).
BENCHMARK_FILES = {
    "aime24": ("aime24",),
    "aime25": ("aime25",),
    "amc23": ("amc23",),
    "gsm8k": ("gsm8k_test", "gsm8k"),
    "math500": ("math500", "math_500", "MATH-500", "math_test"),
    "math": ("math_test", "math"),
}
DATA_SUFFIXES = (".jsonl", ".parquet")
# Hub benchmarks evaluated on another split than their default one, which is the split training reads.
EVAL_SPLITS = {"gsm8k": "test"}
# Where a benchmark's few-shot examples come from by default: its training split, under --data-dir the
# files of these stems, else the Hub dataset of this name (whose default split is its training split).
SHOT_FILES = {"gsm8k": ("gsm8k_train",), "math500": ("math_train",), "math": ("math_train",)}
SHOT_DATASETS = {"gsm8k": "gsm8k"}


# ------------------------------------------------------------------------------------------------
# Pure metrics
# ------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    The probability that k samples drawn without replacement from the n contain a correct one.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def pass_k_values(k: int) -> list[int]:
    """The k' reported for k samples: powers of two below k, and k itself (16 -> 1, 2, 4, 8, 16)."""
    values, p = [], 1
    while p < k:
        values.append(p)
        p *= 2
    return [*values, k]


def majority_vote(answers: Sequence[str | None], same: Callable[[str, str], bool] | None = None) -> str | None:
    """The answer given most often, answers counted equal when `same(a, b)` (default: `answers.verify`).

    Answers are grouped greedily: each joins the first group whose first member it equals. None (no
    answer extracted) never votes. A tie goes to the group that appeared first. Returns the first member
    of the winning group, or None when no answer was extracted at all.
    """
    if same is None:
        same = verify
    groups: list[list[str]] = []
    for answer in answers:
        if answer is None:
            continue
        for group in groups:
            if answer == group[0] or same(answer, group[0]):
                group.append(answer)
                break
        else:
            groups.append([answer])
    if not groups:
        return None
    return max(groups, key=len)[0]  # max keeps the first of equal-sized groups


# ------------------------------------------------------------------------------------------------
# Running a model on a benchmark
# ------------------------------------------------------------------------------------------------


@dataclass
class BenchmarkResult:
    model: str
    benchmark: str
    num_problems: int
    k: int
    mean_at_k: float  # mean accuracy over all samples
    pass_at: dict[str, float]  # k' -> unbiased pass@k' averaged over problems (str keys: JSON)
    maj_at_k: float  # share of problems whose majority answer verifies
    parallel_ratio: float  # share of responses with at least one block
    well_formed_ratio: float  # share of responses passing the strict format check
    blocks_per_response: float
    mean_response_tokens: float  # every response token, paths and inserted tags included
    mean_path_tokens: float  # per path, its <Path> and </Path> included; 0 when there are no paths
    tokens_per_second: float  # response tokens generated per second of generation
    generation_seconds: float
    finish_reasons: dict[str, int] = field(default_factory=dict)
    engine_utilisation: float | None = None  # hf engine: share of computed query slots that fed a real token


def sample_record(
    rollout, problem, model_name: str, benchmark: str, timeout_s: float = 5.0, plans: bool = False,
    max_depth: int = 1,
) -> dict:  # fmt: skip
    """Score one rollout: its `rollout.RolloutRecord`, which holds what the metrics, the viewer and the
    analysis need (`plans`: checked in the planned format; `max_depth`: blocks nest that deep)."""
    score = score_response(
        rollout.text, problem.answer, parallel_active=True, timeout_s=timeout_s, plans=plans, max_depth=max_depth
    )
    return rollout_record(
        rollout,
        question=problem.question,
        gold=problem.answer,
        score=score,
        model=model_name,
        benchmark=benchmark,
        problem_id=problem.id,
    )


def summarize(
    records: Sequence[dict], k: int, model_name: str, benchmark: str, seconds: float, timeout_s: float = 5.0
) -> BenchmarkResult:
    """Aggregate the per-sample records (`rollout.RolloutRecord`) of one model on one benchmark (k records
    per problem); records in the names of older files are read too (`rollout.upgrade_record`)."""
    records = [upgrade_record(r) for r in records]
    by_problem: dict[str, list[dict]] = {}
    for r in records:
        by_problem.setdefault(str(r["problem_id"]), []).append(r)
    for pid, group in by_problem.items():
        if len(group) != k:
            raise ValueError(f"problem {pid} of {benchmark} has {len(group)} samples, expected {k}")
    ks = pass_k_values(k)
    n_problems = max(1, len(by_problem))
    pass_at = {
        str(kk): sum(pass_at_k(k, sum(r["correct"] for r in g), kk) for g in by_problem.values()) / n_problems
        for kk in ks
    }

    def same(a: str, b: str) -> bool:
        return verify(a, b, timeout_s)

    maj = 0
    for group in by_problem.values():
        winner = majority_vote([r["pred"] for r in group], same)
        maj += winner is not None and verify(winner, group[0]["gold"], timeout_s)
    n = max(1, len(records))
    paths = [t for r in records for t in r["path_tokens"]]
    total_tokens = sum(r["response_tokens"] for r in records)
    return BenchmarkResult(
        model=model_name,
        benchmark=benchmark,
        num_problems=len(by_problem),
        k=k,
        mean_at_k=sum(r["correct"] for r in records) / n,
        pass_at=pass_at,
        maj_at_k=maj / n_problems,
        parallel_ratio=sum(r["num_blocks"] > 0 for r in records) / n,
        well_formed_ratio=sum(r["well_formed"] for r in records) / n,
        blocks_per_response=sum(r["num_blocks"] for r in records) / n,
        mean_response_tokens=total_tokens / n,
        mean_path_tokens=sum(paths) / len(paths) if paths else 0.0,
        tokens_per_second=total_tokens / seconds if seconds > 0 else 0.0,
        generation_seconds=seconds,
        finish_reasons=dict(Counter(r["finish_reason"] for r in records)),
    )


def evaluate_benchmark(
    engine, problems: Sequence, cfg: EvalConfig, model_name: str, benchmark: str, shots: Sequence[Shot] = ()
) -> tuple[BenchmarkResult, list[dict]]:
    """Sample cfg.k responses per problem with `engine` (`backends.make_engine`), score and aggregate them.

    The prompts are `prompts.PromptFormat`'s for the engine's tokenizer, with `shots` before each problem.
    Problems go to the engine in chunks of about max_batch_size rollouts, so the progress bar moves;
    each chunk gets its own seed (cfg.seed + chunk index) so that results do not depend on chunking luck.
    """
    fmt = prompt_format(
        engine.tokenizer, cfg.template or PROMPT_TEMPLATE, cfg.chat_template, cfg.system_prompt, tuple(shots)
    )
    # A base model that has answered a plain few-shot prompt goes on with a next problem of its own: its
    # answer is the one before (the stop sequence of the few-shot evaluations).
    cut = SHOT_STOP if shots and not fmt.chat else None
    params = sampling_params(cfg, variant=cfg.variant)
    per_call = max(1, cfg.max_batch_size // cfg.k)
    records: list[dict] = []
    seconds = 0.0
    counted = hasattr(engine, "reset_stats")
    if counted:
        engine.reset_stats()
    with Progress(transient=True) as progress:
        task = progress.add_task(f"{model_name} / {benchmark}", total=len(problems))
        for chunk_index, start in enumerate(range(0, len(problems), per_call)):
            chunk = problems[start : start + per_call]
            params.seed = cfg.seed + chunk_index
            t0 = time.perf_counter()
            rollouts = engine.generate([fmt.render(p.question) for p in chunk], n=cfg.k, params=params)
            seconds += time.perf_counter() - t0
            for rollout in rollouts:
                problem = chunk[rollout.prompt_index]
                if cut is not None and cut in rollout.text:
                    rollout = replace(rollout, text=rollout.text.split(cut, 1)[0])
                caps = (cfg.verify_timeout_s, cfg.plans, cfg.max_depth)
                records.append(sample_record(rollout, problem, model_name, benchmark, *caps))
            progress.advance(task, len(chunk))
    result = summarize(records, cfg.k, model_name, benchmark, seconds, cfg.verify_timeout_s)
    if counted:
        result.engine_utilisation = engine.stats.utilisation
    return result, records


# ------------------------------------------------------------------------------------------------
# Benchmarks, several models, output
# ------------------------------------------------------------------------------------------------


def resolve_benchmark(name: str, data_dir: str | Path | None) -> tuple[str, str]:
    """(benchmark name, source for `data.load_problems`).

    `name=path` names a local file directly. With `data_dir`, the first existing file among
    BENCHMARK_FILES[name] (or `name` itself) with a .jsonl/.parquet suffix is used; without it, the name
    goes to `load_problems`, which knows the Hub copies.
    """
    if "=" in name:
        label, path = name.split("=", 1)
        if not Path(path).is_file():
            raise FileNotFoundError(f"benchmark {label!r}: no file {path}")
        return label, path
    if data_dir is None:
        return name, name
    data_dir = Path(data_dir)
    for stem in BENCHMARK_FILES.get(name, (name,)):
        for suffix in DATA_SUFFIXES:
            path = data_dir / f"{stem}{suffix}"
            if path.is_file():
                if name == "math500" and stem == "math_test":
                    log.warning("math500: no MATH-500 file in %s; using the full MATH test set %s", data_dir, path)
                return name, str(path)
    tried = ", ".join(f"{s}{x}" for s in BENCHMARK_FILES.get(name, (name,)) for x in DATA_SUFFIXES)
    raise FileNotFoundError(f"benchmark {name!r}: none of {tried} in {data_dir}")


def eval_split(source: str) -> str | None:
    """The split evaluated of a benchmark `source` (None: its default, or a local file's rows)."""
    return None if Path(source).exists() else EVAL_SPLITS.get(source)


def shot_source(name: str, source: str, cfg: EvalConfig, data_dir: str | Path | None) -> str:
    """Where the shots of benchmark `name` (read from `source`) come from: `cfg.shots_from`, else the
    benchmark's training split (`SHOT_FILES` under `data_dir`, `SHOT_DATASETS` on the Hub). Never the
    evaluated source: a shot would give its own problem's answer away."""
    if cfg.shots_from is not None:
        chosen = cfg.shots_from
    elif data_dir is not None and name in SHOT_FILES:
        found = [Path(data_dir) / f"{s}{x}" for s in SHOT_FILES[name] for x in DATA_SUFFIXES]
        found = [p for p in found if p.is_file()]
        if not found:
            stems = ", ".join(SHOT_FILES[name])
            raise FileNotFoundError(f"{name}: no training split ({stems}) in {data_dir} to draw shots from")
        chosen = str(found[0])
    elif data_dir is None and name in SHOT_DATASETS:
        chosen = SHOT_DATASETS[name]
    else:
        raise InputError(f"{name}: no training split known to draw shots from; name one with --shots-from")
    local = Path(chosen).exists() and Path(source).exists()
    same_split = eval_split(source) is None  # the shots are read from a source's default split
    if (chosen == source and same_split) or (local and Path(chosen).resolve() == Path(source).resolve()):
        raise InputError(f"{name}: shots would be drawn from the evaluated problems ({source}); use a training split")
    return chosen


def shot_pool(name: str, source: str, cfg: EvalConfig, data_dir: str | Path | None) -> list[Problem]:
    """The problems with worked solutions that benchmark `name`'s shots are drawn from."""
    chosen = shot_source(name, source, cfg, data_dir)
    pool = [p for p in load_problems(chosen) if p.solution]
    if not pool:
        raise InputError(f"{chosen}: no worked solutions to draw shots from (a 'solution' field, or GSM8K's '####')")
    log.info("%s: %d shots drawn from %s", name, cfg.shots, chosen)
    return pool


@contextlib.contextmanager
def eval_engine(model_name: str, cfg: EvalConfig):
    """The engine of `cfg.backend` on `model_name`. vLLM loads weights from files only: a preset is saved to
    a temporary folder first (kept while the engine lives)."""
    if cfg.backend == "hf":
        model, tokenizer = load_model_and_tokenizer(model_name)
        yield make_engine("hf", model, tokenizer, max_batch_size=cfg.max_batch_size)
    elif model_name not in PRESETS:
        yield make_engine("vllm", model_name)
    else:
        with tempfile.TemporaryDirectory(prefix="parallel-r1-vllm-") as folder:
            model, tokenizer = load_model_and_tokenizer(model_name)
            yield make_engine("vllm", str(save_model(model, tokenizer, folder)), tokenizer)


def run_eval(
    models: Sequence[str],
    benchmarks: Sequence[str],
    cfg: EvalConfig,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    out: str | Path | None = None,
) -> list[BenchmarkResult]:
    """Evaluate each model on each benchmark; write `out` (JSON) and `out` with .samples.jsonl."""
    sources = [resolve_benchmark(b, data_dir) for b in benchmarks]
    problem_sets = {label: load_problems(source, eval_split(source), limit) for label, source in sources}
    shots: dict[str, tuple[Shot, ...]] = {}
    for label, source in sources if cfg.shots else ():
        pool = shot_pool(label, source, cfg, data_dir)
        shots[label] = draw_shots(pool, cfg.shots, cfg.seed, [p.question for p in problem_sets[label]])
    results: list[BenchmarkResult] = []
    samples: list[dict] = []
    for model_name in models:
        with eval_engine(model_name, cfg) as engine:
            for label, problems in problem_sets.items():
                result, records = evaluate_benchmark(engine, problems, cfg, model_name, label, shots.get(label, ()))
                results.append(result)
                samples.extend(records)
                log.info("%s / %s: mean@%d %.3f", model_name, label, cfg.k, result.mean_at_k)
    if out is not None:
        write_results(out, results, samples, cfg)
    return results


def samples_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".samples.jsonl")


def write_results(out: str | Path, results: Sequence[BenchmarkResult], samples: Sequence[dict], cfg: EvalConfig):
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from parallel_r1.answers import checker_info

    payload = {"config": asdict(cfg), "results": [asdict(r) for r in results], "samples": samples_path(out).name}
    # Which answer checker produced the scores, so that results of different checkers are not compared unknowingly.
    payload["checker"] = checker_info(cfg.verify_timeout_s)
    atomic_write_text(out, json.dumps(payload, indent=2) + "\n")
    with samples_path(out).open("w", encoding="utf-8") as f:
        for record in samples:
            f.write(json.dumps(record) + "\n")


def markdown_table(results: Sequence[BenchmarkResult]) -> str:
    """One row per model x benchmark; pass@k' columns for every k' of the largest k."""
    ks = pass_k_values(max((r.k for r in results), default=1))
    head = ["model", "benchmark", "n", "mean@k", *[f"pass@{kk}" for kk in ks], "maj@k", "parallel", "blocks/resp"]
    head += ["resp tok", "path tok", "tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        passes = [f"{r.pass_at[str(kk)]:.3f}" if str(kk) in r.pass_at else "-" for kk in ks]
        cells = [r.model, r.benchmark, str(r.num_problems), f"{r.mean_at_k:.3f}", *passes, f"{r.maj_at_k:.3f}"]
        cells += [f"{r.parallel_ratio:.2f}", f"{r.blocks_per_response:.2f}", f"{r.mean_response_tokens:.0f}"]
        cells += [f"{r.mean_path_tokens:.0f}", f"{r.tokens_per_second:.1f}"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
