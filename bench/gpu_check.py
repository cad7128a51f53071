"""What the CPU test suite cannot prove, checked on a CUDA GPU in one command (under 8 minutes; the
DeepSpeed runs, when deepspeed is installed, add four launches).

    python bench/gpu_check.py            # every check; one table; exit 1 if a check fails, 2 without CUDA
    python bench/gpu_check.py --skip-launch   # in-process checks only (no `accelerate launch` runs)

Needs torch and transformers only (vLLM is checked when it is installed); uses the tiny model built from
scratch and the built-in task, so nothing is downloaded. Checks:

* engine consistency, fp32 and bf16, Seen and Unseen: the hf engine's sampling log-probs against the
  training forward (`attention.response_logprobs`) on the rollouts it sampled (what `old_logprobs: auto`
  relies on), and that a sample depends on (seed, key, sample index) only, not on the batch it decoded in
  (what makes 1 and 2 processes sample the same GRPO rollouts);
* one SFT step and one GRPO step with each attention backend present (sdpa, flex_attention), bf16;
* decode throughput of the engine for N = 1 (no block), 2, 4, 8 paths (bf16); with vLLM installed (also on
  CPU, where bench/build_vllm_cpu.sh builds it): its throughput, its threads log-probs against the trainer's
  and `load_weights` (samples change, and come back with the first weights);
* `accelerate launch` runs: FSDP2 (`--use_fsdp --fsdp_version 2`, 1 process, or 2 with two GPUs) resumed
  from a middle checkpoint ends on the uninterrupted run, and its final model is a plain Hugging Face
  folder; with two GPUs, DDP with 2 processes matches 1 process (SFT and GRPO); with deepspeed installed,
  ZeRO-2 and ZeRO-3 (`--use_deepspeed --zero_stage N`, 1 or 2 processes) resumed in the GRPO stage end on
  the uninterrupted run, ZeRO-3 agrees with ZeRO-2, and the final models are plain Hugging Face folders.

`--device cpu` runs the same checks on the CPU to test this script itself (fp32 in place of bf16, no
flex_attention training step: FlexAttention has no backward on CPU; the DDP launch, and DeepSpeed's if
installed, on 2 CPU processes, no FSDP launch: accelerate turns FSDP on for GPUs only); it is not a GPU check.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_DIMS = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 336}
# fp32 on GPU: TF32 is turned off, so both sides round alike to ~1e-6; 1e-4 leaves room for reduction order.
FP32_LOGPROB_TOL = 1e-4
# bf16 keeps 8 bits of mantissa: log-probs of a few units carry errors of ~1e-2 per token whenever the
# engine's and the training forward's kernels differ (incremental decode vs one full forward).
BF16_LOGPROB_MEAN_TOL = 0.05
BATCH_INVARIANCE_MIN = 0.9  # share of samples identical when decoded 64 vs 3 rows at a time (fp32)
LAUNCH_RTOL = 1e-4  # launched runs on GPU: losses, relative (cuBLAS/atomics reorder float32 sums)
LAUNCH_WEIGHT_ATOL = 1e-4


@dataclasses.dataclass
class Row:
    check: str
    ok: bool | None  # None: informational
    value: str
    limit: str = ""
    seconds: float = 0.0


ROWS: list[Row] = []


def record(check: str, ok: bool | None, value: str, limit: str = "", started: float | None = None) -> None:
    seconds = time.perf_counter() - started if started is not None else 0.0
    ROWS.append(Row(check, ok, value, limit, seconds))
    mark = {True: "ok", False: "FAIL", None: "--"}[ok]
    print(f"[{mark:>4}] {check}: {value} {('(limit ' + limit + ')') if limit else ''}", flush=True)


def guarded(name: str):
    """Run a check function; an exception is a failed check with its message in the table."""

    def wrap(fn):
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                fn(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - every failure becomes a row
                traceback.print_exc()
                record(
                    name.format(*args, **kwargs), False, f"{type(error).__name__}: {str(error)[:160]}", started=started
                )

        return run

    return wrap


# ---------------------------------------------------------------------------------------------------
# The tiny model.


def tiny_model(device, dtype, attn: str = "sdpa", seed: int = 0):
    import torch

    from parallel_r1.models import build_tiny

    model, tokenizer = build_tiny(TINY_DIMS, seed=seed)
    if model.config._attn_implementation != attn:
        model.set_attn_implementation(attn)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, torch


def biased_head(model, tokenizer, bias: dict[int, float]):
    """Replace the output layer by one with a bias (e.g. towards the tags, so that responses fork paths)."""
    import torch

    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.weight.shape[1], old.weight.shape[0], bias=True)
    head = head.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        for token, value in bias.items():
            head.bias[token] = value
    model.set_output_embeddings(head)


# ---------------------------------------------------------------------------------------------------
# Engine consistency.


@guarded("engine consistency ({1})")
def check_engine(device, dtype_name: str) -> None:
    import torch

    from parallel_r1.batch import collate_rollouts, recompute_logprobs
    from parallel_r1.engine import ParallelEngine, SamplingParams
    from parallel_r1.format import TagIds

    dtype = getattr(torch, dtype_name)
    model, tokenizer, _ = tiny_model(device, dtype)
    tags = TagIds.from_tokenizer(tokenizer)
    biased_head(model, tokenizer, {tags.parallel_open: 4.0, tags.path_close: 3.0, tags.summary_close: 3.0})
    prompts = [f"Problem: {a} + {b} = ?\n" for a, b in zip(range(3, 19), range(40, 56))]
    for variant in ("seen", "unseen", "threads"):
        started = time.perf_counter()
        params = SamplingParams(
            temperature=1.0, seed=11, max_response_tokens=96, max_path_tokens=24, variant=variant, num_paths=2
        )
        engine = ParallelEngine(model, tokenizer, max_batch_size=64)
        rollouts = engine.generate(prompts, n=4, params=params)
        blocks = sum(r.structure.num_blocks > 0 for r in rollouts) / len(rollouts)
        batch = collate_rollouts(rollouts, [0.0] * len(rollouts), tokenizer.pad_token_id).to(device)
        recomputed = recompute_logprobs(model, batch, tags, variant, temperature=1.0, micro_batch_size=16)
        mask = batch.loss_mask_BT
        gap = (recomputed - batch.old_logp_BT).abs() * mask
        mean_gap, max_gap = (gap.sum() / mask.sum()).item(), gap.max().item()
        name = f"engine log-probs = training forward ({dtype_name}, {variant})"
        if dtype_name == "float32":
            ok = max_gap <= FP32_LOGPROB_TOL and blocks > 0
            record(name, ok, f"max |gap| {max_gap:.2e}, {blocks:.0%} forked", f"{FP32_LOGPROB_TOL:g}", started)
        else:
            ok = mean_gap <= BF16_LOGPROB_MEAN_TOL and blocks > 0
            value = f"mean |gap| {mean_gap:.2e}, max {max_gap:.2e}, {blocks:.0%} forked"
            record(name, ok, value, f"mean {BF16_LOGPROB_MEAN_TOL:g}", started)
        if dtype_name == "float32":
            started = time.perf_counter()
            small = ParallelEngine(model, tokenizer, max_batch_size=3)
            keys = list(range(len(prompts)))
            again = small.generate(prompts[::-1], n=4, params=params, keys=keys[::-1])
            by_key = {(keys[::-1][r.prompt_index], r.sample_index): r.response_ids for r in again}
            same = sum(by_key[(r.prompt_index, r.sample_index)] == r.response_ids for r in rollouts) / len(rollouts)
            record(
                f"samples independent of the batch ({variant})",
                same >= BATCH_INVARIANCE_MIN,
                f"{same:.0%} identical (64 vs 3 rows, reversed order)",
                f">= {BATCH_INVARIANCE_MIN:.0%}",
                started,
            )


@guarded("update rows ({1}, {2})")
def check_update_rows(device, dtype_name: str, attn: str) -> None:
    """GRPO's default update layout, grouped rows (a group's prompt once, no padding; flex attention's
    BlockMask or the chunked sdpa kernel), against padded rows: the same log-probs on every trained token."""
    import torch

    from parallel_r1.batch import collate_rollouts, recompute_logprobs
    from parallel_r1.engine import ParallelEngine, SamplingParams
    from parallel_r1.format import TagIds

    started = time.perf_counter()
    model, tokenizer, _ = tiny_model(device, getattr(torch, dtype_name), attn)
    tags = TagIds.from_tokenizer(tokenizer)
    biased_head(model, tokenizer, {tags.parallel_open: 4.0, tags.path_close: 3.0, tags.summary_close: 3.0})
    prompts = [f"Problem: {a} + {b} = ?\n" * (1 + a % 3) for a, b in zip(range(3, 11), range(40, 48))]
    gaps = {}
    for variant in ("seen", "unseen", "threads"):
        params = SamplingParams(seed=5, max_response_tokens=96, max_path_tokens=24, variant=variant)
        rollouts = ParallelEngine(model, tokenizer, max_batch_size=64).generate(prompts, n=4, params=params)
        batch = collate_rollouts(rollouts, [0.0] * len(rollouts), tokenizer.pad_token_id).to(device)
        padded, grouped = (
            recompute_logprobs(model, batch, tags, variant, 1.0, micro_batch_size=16, rows=rows)
            for rows in ("padded", "grouped")
        )
        mask = batch.loss_mask_BT > 0
        gaps[variant] = (grouped - padded).abs()[mask].max().item()
    limit = FP32_LOGPROB_TOL if dtype_name == "float32" else 0.1
    detail = ", ".join(f"{v} max {g:.1e}" for v, g in gaps.items())
    name = f"grouped update rows = padded rows ({attn}, {dtype_name})"
    record(name, max(gaps.values()) <= limit, detail, f"{limit:g}", started)


# ---------------------------------------------------------------------------------------------------
# One SFT step and one GRPO step per attention backend.


def hash_reward(grpo_module) -> None:
    """+1 / -1 by a hash of the response text: an untrained model's groups then vary and GRPO updates."""
    real = grpo_module.score_batch
    if getattr(real, "_hashed", False):
        return

    def score_batch(texts, *args, **kwargs):
        scores = real(texts, *args, **kwargs)
        return [
            dataclasses.replace(s, reward=1.0 if zlib.crc32(t.encode()) % 2 else -1.0) for s, t in zip(scores, texts)
        ]

    score_batch._hashed = True
    grpo_module.score_batch = score_batch


def stage_yaml(dtype: str, attn: str, variant: str = "unseen") -> str:
    dims = ", ".join(f"{k}: {v}" for k, v in TINY_DIMS.items())
    model = f"{{name_or_path: tiny, dtype: {dtype}, attn_implementation: {attn}, tiny: {{{dims}}}}}"
    return f"""
name: gpu-check
seed: 1
logging: {{progress: false}}
stages:
  - name: sft
    kind: sft
    variant: {variant}
    model: {model}
    data: {{source: task, task_size: 64, eval_size: 8, prompt: question}}
    lr: 1.0e-3
    warmup_steps: 0
    max_steps: 4
    save_every: 2
    keep_last: 3
    sft: {{batch_size: 4, grad_accum: 2, epochs: 1}}
  - name: grpo
    kind: grpo
    variant: {variant}
    data: {{source: task, task_size: 32, prompt: question}}
    lr: 1.0e-3
    warmup_steps: 0
    max_steps: 4
    save_every: 2
    grpo:
      prompts_per_step: 4
      n: 4
      mini_batch_size: 2
      micro_batch_size: 8
      rollout: {{max_response_tokens: 48, max_path_tokens: 12, max_blocks: 2, max_batch_size: 64}}
"""


@guarded("train steps ({1}, {2})")
def check_train_steps(device, attn: str, dtype: str, workdir: Path) -> None:
    import torch

    from parallel_r1 import grpo
    from parallel_r1.config import parse_recipe
    from parallel_r1.grpo import GRPOTrainer
    from parallel_r1.sft import SFTTrainer

    hash_reward(grpo)
    recipe = parse_recipe(stage_yaml(dtype, attn))
    sft_stage, grpo_stage = recipe.stages
    out = workdir / f"steps-{attn}"
    shutil.rmtree(out, ignore_errors=True)

    started = time.perf_counter()
    trainer = SFTTrainer(sft_stage, out / "sft", init_model="tiny", seed=1)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics, _ = trainer.step()
    moved = max((p.detach() - b).abs().max().item() for p, b in zip(trainer.model.parameters(), before))
    ok = math.isfinite(metrics["loss"]) and moved > 0 and str(trainer.accelerator.device).startswith(device)
    record(f"SFT step ({attn}, {dtype})", ok, f"loss {metrics['loss']:.3f}, max |dw| {moved:.1e}", "", started)
    folder = trainer.save()
    del trainer

    started = time.perf_counter()
    trainer = GRPOTrainer(grpo_stage, out / "grpo", init_model=folder, seed=1)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics, _ = trainer.step()
    moved = max((p.detach() - b).abs().max().item() for p, b in zip(trainer.model.parameters(), before))
    gap = metrics.get("mismatch_max")
    ok = math.isfinite(metrics["loss"]) and metrics["optimizer_steps"] > 0 and moved > 0
    value = f"loss {metrics['loss']:.3f}, {metrics['generated_tokens']:.0f} tokens sampled"
    if gap is not None:
        value += f", sampler gap max {gap:.1e}"
    record(f"GRPO step ({attn}, {dtype})", ok, value, "", started)
    del trainer
    if device == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# Throughput.


@guarded("decode throughput ({1})")
def check_throughput(device, dtype_name: str, path_tokens: int, prompts: int) -> None:
    import torch

    from parallel_r1.engine import ParallelEngine, SamplingParams
    from parallel_r1.format import TagIds

    model, tokenizer, _ = tiny_model(device, getattr(torch, dtype_name))
    tags = TagIds.from_tokenizer(tokenizer)
    # Paths and responses run to their caps: every run decodes a known number of tokens.
    biased_head(model, tokenizer, {tags.path_close: -1e4, tokenizer.eos_token_id: -1e4, tags.parallel_open: -1e4})
    engine = ParallelEngine(model, tokenizer, max_batch_size=prompts)
    batch = [f"Problem: find the shortest route from node {i} to node {i + 7}.\n" for i in range(prompts)]
    base = None
    for n in (1, 2, 4, 8):
        started = time.perf_counter()
        if n == 1:
            params = SamplingParams(seed=0, max_response_tokens=path_tokens, max_blocks=0)
        else:
            params = SamplingParams(
                seed=0,
                max_response_tokens=n * path_tokens + 8,
                max_path_tokens=path_tokens,
                max_blocks=1,
                num_paths=n,
                open_block=True,
                variant="unseen",
            )
        engine.generate(batch[:2], n=1, params=params)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        rollouts = engine.generate(batch, n=1, params=params)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        tokens = sum(len(r.response_ids) for r in rollouts)
        rate = tokens / elapsed
        base = base or rate
        record(
            f"decode N={n} ({dtype_name}, {prompts} prompts)",
            None,
            f"{rate:,.0f} tokens/s ({rate / base:.2f}x N=1), {tokens} tokens in {elapsed:.2f}s",
            started=started,
        )


@guarded("vLLM")
def check_vllm(workdir: Path, device: str) -> None:
    """vLLM's throughput, its threads log-probs against the trainer's, and `load_weights`. On CPU (vLLM's
    CPU backend, bench/build_vllm_cpu.sh) the engine runs in fp32 and eager, its KV cache sized by
    VLLM_CPU_KVCACHE_SPACE; its attention needs a head size that is a multiple of 16 (TINY_DIMS: 32)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        record("vLLM engine", None, "not installed: skipped")
        return
    import torch

    from parallel_r1.backends import make_engine
    from parallel_r1.batch import collate_rollouts, recompute_logprobs
    from parallel_r1.format import TagIds
    from parallel_r1.models import save_model
    from parallel_r1.rollout import SamplingParams

    cpu = device == "cpu"
    if cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    dtype = "float32" if cpu else "bfloat16"
    extra = {"enforce_eager": True} if cpu else {"gpu_memory_utilization": 0.3}
    started = time.perf_counter()
    model, tokenizer, _ = tiny_model("cpu", torch.float32)
    folder = save_model(model, tokenizer, workdir / "vllm-tiny")
    # colocated: in this process, as GRPO runs it, so that load_weights can hand tensors over
    engine = make_engine("vllm", str(folder), tokenizer, colocate=True, dtype=dtype, **extra)
    prompts = [f"Problem: {i} + {i} = ?\n" for i in range(8 if cpu else 64)]
    params = SamplingParams(seed=0, max_response_tokens=64 if cpu else 128, max_path_tokens=32, variant="unseen")
    engine.generate(prompts[:2], n=1, params=params)
    t0 = time.perf_counter()
    rollouts = engine.generate(prompts, n=4, params=params)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(r.response_ids) for r in rollouts)
    ok = len(rollouts) == 4 * len(prompts) and tokens > 0
    record(f"vLLM engine ({dtype}, {len(prompts)} prompts x 4)", ok, f"{tokens / elapsed:,.0f} tokens/s", "", started)

    # The vLLM request pattern is the threads variant: trained as threads, the sampled tokens' log-probs
    # differ from vLLM's by kernel numerics only; trained as unseen, the summaries add a structural gap.
    # At temperature 1 only: vLLM's default log-probs are taken before temperature (GRPO's engine is built
    # with vllm_backend.logprobs_mode(T), which applies it; docs/engine.md).
    started = time.perf_counter()
    model = model.to(device)
    tags = TagIds.from_tokenizer(tokenizer)
    gaps = {}
    for variant in ("threads", "unseen"):
        params = SamplingParams(
            seed=1, max_response_tokens=96, max_path_tokens=24, variant=variant, open_block=True, num_paths=3
        )
        sampled = engine.generate(prompts[:16], n=2, params=params)
        batch = collate_rollouts(sampled, [0.0] * len(sampled), tokenizer.pad_token_id).to(device)
        trained = recompute_logprobs(model, batch, tags, variant, temperature=1.0, micro_batch_size=16)
        gap = (trained - batch.sampler_logp_BT).abs()[batch.loss_mask_BT > 0]
        gaps[variant] = (gap.mean().item(), gap.max().item())
    # CPU, fp32 on both sides: measured max 1e-6 (threads), 5e-2 (unseen)
    limit = 1e-4 if cpu else 0.1
    ok = (gaps["threads"][1] if cpu else gaps["threads"][0]) < limit and gaps["threads"][0] < gaps["unseen"][0]
    detail = ", ".join(f"{v} mean {m:.2e} max {x:.2e}" for v, (m, x) in gaps.items())
    record(f"vLLM samples threads on-policy ({dtype} vs fp32 trainer)", ok, detail, f"threads {limit:g}", started)

    # Weight sync: what GRPO does after every update. vLLM's layers may hold kernel-format copies of the
    # weights (oneDNN-packed on CPU), so only `reload_weights` (VLLMEngine.load_weights) reaches them.
    started = time.perf_counter()
    params = SamplingParams(seed=2, max_response_tokens=48, max_path_tokens=16, variant="threads", open_block=True)
    before = [r.response_ids for r in engine.generate(prompts[:4], n=2, params=params)]
    other, _, _ = tiny_model(device, torch.float32, seed=1)
    engine.load_weights(other.state_dict().items())
    changed = [r.response_ids for r in engine.generate(prompts[:4], n=2, params=params)] != before
    engine.load_weights(model.state_dict().items())
    restored = [r.response_ids for r in engine.generate(prompts[:4], n=2, params=params)] == before
    record("vLLM load_weights", changed and restored, f"samples change {changed}, restored {restored}", "", started)

    # At another temperature GRPO's engine reports processed log-probs (temperature applied, of what the bans
    # and top-k/top-p left): at or above the trainer's full-vocabulary ones, by the log of the removed mass.
    from parallel_r1.vllm_backend import logprobs_mode

    started = time.perf_counter()
    warm = make_engine(
        "vllm", str(folder), tokenizer, colocate=True, dtype=dtype, logprobs_mode=logprobs_mode(0.7), **extra
    )
    params = SamplingParams(
        seed=1, temperature=0.7, max_response_tokens=96, max_path_tokens=24, variant="threads", open_block=True
    )
    sampled = warm.generate(prompts[:16], n=2, params=params)
    batch = collate_rollouts(sampled, [0.0] * len(sampled), tokenizer.pad_token_id).to(device)
    trained = recompute_logprobs(model, batch, tags, "threads", temperature=0.7, micro_batch_size=16)
    gap = (batch.sampler_logp_BT - trained)[batch.loss_mask_BT > 0]
    # CPU, fp32, untrained tiny model: measured +0.014 to +0.033 (its mass on the banned tags)
    low = -1e-4 if cpu else -0.1
    ok = gap.min().item() > low and gap.mean().item() < 0.1
    detail = f"sampler - trainer min {gap.min():.2e} mean {gap.mean():.2e} max {gap.max():.2e}"
    record(f"vLLM log-probs at T=0.7 ({dtype}, processed)", ok, detail, f"min > {low:g}, mean < 0.1", started)


# ---------------------------------------------------------------------------------------------------
# accelerate launch runs.


def _launch(workdir: Path, name: str, launch_args: list[str], config: Path, env: dict | None = None) -> Path:
    run = workdir / name
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "--num_machines=1"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd += ["--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={port}"]
    cmd += [str(workdir / "entry.py"), "train", "--config", str(config), "--run-dir", str(run)]
    full_env = {**os.environ, "NVIDIA_TF32_OVERRIDE": "0", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return run


def _compare(a: Path, b: Path, rtol: float, weight_atol: float) -> tuple[bool, str]:
    """Stage folders `a`, `b`: same steps and data, losses within rtol (plus 1e-6 absolute: GRPO losses sit
    near 0), the same rollouts when there are any, final weights within weight_atol."""
    from safetensors.torch import load_file

    from parallel_r1.files import read_jsonl
    from parallel_r1.trainer import final_model

    rows_a, rows_b = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    if [(r["step"], r["data_indices"]) for r in rows_a] != [(r["step"], r["data_indices"]) for r in rows_b]:
        return False, "different steps or data logged"
    excess = max(abs(ra["loss"] - rb["loss"]) - rtol * abs(rb["loss"]) for ra, rb in zip(rows_a, rows_b))
    worst_loss = max(abs(ra["loss"] - rb["loss"]) for ra, rb in zip(rows_a, rows_b))
    same_rollouts = True
    if (a / "rollouts.jsonl").is_file():

        def samples(folder: Path) -> list:
            rows = read_jsonl(folder / "rollouts.jsonl")
            return sorted((r["step"], r["problem_index"], r["response"]) for r in rows)

        same_rollouts = samples(a) == samples(b)
    wa, wb = load_file(final_model(a) / "model.safetensors"), load_file(final_model(b) / "model.safetensors")
    if wa.keys() != wb.keys():
        return False, "different weight names"
    worst_w = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    ok = excess <= 1e-6 and worst_w <= weight_atol and same_rollouts
    value = f"loss diff {worst_loss:.1e}, weight diff {worst_w:.1e}"
    return ok, value + ("" if same_rollouts else ", rollouts differ")


ENTRY = """
import sys
sys.path.insert(0, {bench!r})
import gpu_check
from parallel_r1 import grpo
from parallel_r1.cli import main
gpu_check.hash_reward(grpo)
sys.exit(main(sys.argv[1:]))
"""


def _resume_from_middle(
    workdir: Path, full: Path, name: str, copy_done: list[str], resume: str, launch_args: list[str], config: Path
) -> Path:
    """Run `name` as the run `full` resumed after a crash in stage `resume`, just after its checkpoint 2:
    the stages `copy_done` finished, `resume` holding that checkpoint and its logs up to step 2."""
    from parallel_r1.files import read_jsonl

    run = workdir / name
    shutil.rmtree(run, ignore_errors=True)
    for stage in copy_done:
        shutil.copytree(full / stage, run / stage)
    (run / resume).mkdir(parents=True)
    shutil.copytree(full / resume / "checkpoint-000002", run / resume / "checkpoint-000002")
    for log in ("metrics.jsonl", "rollouts.jsonl"):
        if (full / resume / log).is_file():
            rows = [r for r in read_jsonl(full / resume / log) if r["step"] <= 2]
            (run / resume / log).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return _launch(workdir, name, launch_args, config)


@guarded("FSDP resume")
def check_fsdp(workdir: Path, gpus: int) -> None:
    from parallel_r1.checkpoint import checkpoint_info
    from parallel_r1.trainer import final_model

    started = time.perf_counter()
    config = workdir / "fsdp.yaml"
    config.write_text(stage_yaml("float32", "sdpa"))
    procs = min(gpus, 2)
    fsdp = [
        "--use_fsdp",
        "--fsdp_version=2",
        f"--num_processes={procs}",
        "--fsdp_auto_wrap_policy=TRANSFORMER_BASED_WRAP",
        "--fsdp_transformer_layer_cls_to_wrap=LlamaDecoderLayer",
        "--fsdp_state_dict_type=SHARDED_STATE_DICT",
        "--fsdp_cpu_ram_efficient_loading=false",
    ]
    full = _launch(workdir, "fsdp-full", fsdp, config)
    # The same run resumed as after a crash: (a) in the SFT stage, from its middle checkpoint; (b) in the
    # GRPO stage, from its middle checkpoint.
    _resume_from_middle(workdir, full, "fsdp-sft", [], "00-sft", fsdp, config)
    _resume_from_middle(workdir, full, "fsdp-grpo", ["00-sft"], "01-grpo", fsdp, config)
    info = checkpoint_info(final_model(full / "00-sft"))
    sharded = info.get("distributed_type") == "FSDP" and (final_model(full / "00-sft") / "accelerator").is_dir()
    ok_sft, sft_value = _compare(full / "00-sft", workdir / "fsdp-sft" / "00-sft", LAUNCH_RTOL, LAUNCH_WEIGHT_ATOL)
    ok_grpo, grpo_value = _compare(full / "01-grpo", workdir / "fsdp-grpo" / "01-grpo", LAUNCH_RTOL, LAUNCH_WEIGHT_ATOL)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(final_model(full / "01-grpo"))  # a plain Hugging Face folder
    record(
        f"FSDP2 x{procs}: resumed = uninterrupted (SFT; GRPO)",
        sharded and ok_sft and ok_grpo,
        f"SFT {sft_value}; GRPO {grpo_value}",
        f"rel {LAUNCH_RTOL:g}, abs {LAUNCH_WEIGHT_ATOL:g}",
        started,
    )


@guarded("DeepSpeed resume")
def check_deepspeed(workdir: Path, procs: int) -> None:
    """ZeRO-2 and ZeRO-3 by the user's line, `accelerate launch --use_deepspeed --zero_stage N`: each resumed in
    its GRPO stage ends on its uninterrupted run; ZeRO-3 agrees with ZeRO-2; the final models are plain Hugging
    Face folders. (tests/test_deepspeed.py runs the same on 2 CPU processes, against 1 process.)"""
    from transformers import AutoModelForCausalLM

    from parallel_r1.checkpoint import checkpoint_info
    from parallel_r1.trainer import final_model

    started = time.perf_counter()
    config = workdir / "deepspeed.yaml"
    config.write_text(stage_yaml("float32", "sdpa"))
    full = {}
    for zero in (2, 3):
        args = ["--use_deepspeed", f"--zero_stage={zero}", f"--num_processes={procs}"]
        full[zero] = _launch(workdir, f"zero{zero}-full", args, config)
        resumed = _resume_from_middle(workdir, full[zero], f"zero{zero}-grpo", ["00-sft"], "01-grpo", args, config)
        ok, value = _compare(full[zero] / "01-grpo", resumed / "01-grpo", LAUNCH_RTOL, LAUNCH_WEIGHT_ATOL)
        ok = ok and checkpoint_info(final_model(full[zero] / "01-grpo")).get("distributed_type") == "DEEPSPEED"
        AutoModelForCausalLM.from_pretrained(final_model(full[zero] / "01-grpo"))  # a plain Hugging Face folder
        limit = f"rel {LAUNCH_RTOL:g}, abs {LAUNCH_WEIGHT_ATOL:g}"
        record(f"ZeRO-{zero} x{procs}: resumed = uninterrupted (GRPO)", ok, value, limit, started)
        started = time.perf_counter()
    for stage in ("00-sft", "01-grpo"):
        ok, value = _compare(full[2] / stage, full[3] / stage, LAUNCH_RTOL, LAUNCH_WEIGHT_ATOL)
        record(f"ZeRO-3 = ZeRO-2 x{procs} ({stage[3:]})", ok, value, f"rel {LAUNCH_RTOL:g}, abs {LAUNCH_WEIGHT_ATOL:g}")


@guarded("DDP x2")
def check_ddp(workdir: Path) -> None:
    started = time.perf_counter()
    two_cfg, one_cfg = workdir / "ddp2.yaml", workdir / "ddp1.yaml"
    two_cfg.write_text(stage_yaml("float32", "sdpa"))
    # 1 process: the same global batch (SFT batch_size is per process).
    one_cfg.write_text(stage_yaml("float32", "sdpa").replace("batch_size: 4,", "batch_size: 8,"))
    two = _launch(workdir, "ddp-two", ["--multi_gpu", "--num_processes=2"], two_cfg)
    one = _launch(workdir, "ddp-one", ["--num_processes=1"], one_cfg)
    for stage in ("00-sft", "01-grpo"):
        ok, value = _compare(one / stage, two / stage, LAUNCH_RTOL, LAUNCH_WEIGHT_ATOL)
        record(f"DDP x2 = 1 process ({stage[3:]})", ok, value, f"rel {LAUNCH_RTOL:g}, abs {LAUNCH_WEIGHT_ATOL:g}")
    ROWS[-1].seconds = time.perf_counter() - started


# ---------------------------------------------------------------------------------------------------


def deepspeed_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def print_table() -> None:
    width = max(len(r.check) for r in ROWS)
    print()
    print(f"{'check'.ljust(width)}  result  {'value':<70} limit")
    print("-" * (width + 90))
    for r in ROWS:
        mark = {True: "ok", False: "FAIL", None: "info"}[r.ok]
        print(f"{r.check.ljust(width)}  {mark:<6}  {r.value:<70} {r.limit} [{r.seconds:.1f}s]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: test this script (slow)")
    parser.add_argument("--skip-launch", action="store_true", help="no `accelerate launch` runs (FSDP, DDP, DeepSpeed)")
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary folder, removed)")
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False): this script checks a GPU set-up. "
            "Run it on a machine with an NVIDIA GPU and a CUDA build of torch, or pass --device cpu to test the "
            "script itself.",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        name = torch.cuda.get_device_name(0)
        record("device", None, f"{name}, {torch.cuda.device_count()} GPU(s), torch {torch.__version__}")
    else:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        record("device", None, f"CPU (script test only), torch {torch.__version__}")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "entry.py").write_text(ENTRY.format(bench=str(Path(__file__).resolve().parent)))
    started = time.perf_counter()
    low = "bfloat16" if args.device == "cuda" else "float32"
    try:
        check_engine(args.device, "float32")
        if args.device == "cuda":
            check_engine(args.device, "bfloat16")
        backends = ["sdpa"]
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

            backends.append("flex_attention")
        except ImportError:
            record("flex_attention", None, "not in this torch: skipped")
        for attn in backends:
            if attn == "flex_attention" and args.device == "cpu":
                record("train steps (flex_attention)", None, "FlexAttention has no backward on CPU: skipped")
                continue
            check_update_rows(args.device, "float32", attn)
            check_train_steps(args.device, attn, low, workdir)
        if args.device == "cuda":
            check_throughput(args.device, "bfloat16", path_tokens=128, prompts=64)
        else:
            check_throughput(args.device, "float32", path_tokens=8, prompts=2)
        check_vllm(workdir, args.device)
        if args.device == "cuda" and not args.skip_launch:
            gpus = torch.cuda.device_count()
            check_fsdp(workdir, gpus)
            if deepspeed_installed():
                check_deepspeed(workdir, min(gpus, 2))
            else:
                record("DeepSpeed ZeRO-2/3", None, "not installed (pip install parallel-r1[deepspeed]): skipped")
            if gpus >= 2:
                check_ddp(workdir)
            else:
                record("DDP x2 = 1 process", None, "one GPU: skipped (tests/test_distributed.py covers it on CPU)")
        elif not args.skip_launch:  # the launch machinery itself, on 2 CPU processes (FSDP needs GPUs here)
            check_ddp(workdir)
            if deepspeed_installed():
                check_deepspeed(workdir, 2)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    record("total", None, f"{time.perf_counter() - started:.0f}s", "480s", None)
    print_table()
    failed = [r.check for r in ROWS if r.ok is False]
    print(f"\n{len(failed)} failed check(s)" + (": " + "; ".join(failed) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
