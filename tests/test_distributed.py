"""Several processes for real: `parallel-r1 train` launched with 2 CPU processes over gloo.

Launchers. `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.15 (its CPU
launcher only forks several through MPI, `--mpirun_hostfile`), so the tests launch the two lines that do
start two processes on a machine without GPUs, both shown in docs/training.md:

    torchrun --standalone --nproc_per_node 2 -m parallel_r1.cli train ...
    accelerate launch --multi_gpu --num_processes 2 -m parallel_r1.cli train ...

(`trainer.make_accelerator` turns on accelerate's CPU mode when WORLD_SIZE > 1 and no GPU exists.)

Tolerance of 1 vs 2 processes. With the same global batch the two runs compute the same sums in a
different order: a 2-row forward per process instead of a 4-row one (other padding widths, other matmul
blockings), the engine decoding other rows side by side, then gloo's all-reduce adding the two processes'
gradients. Each float32 operation rounds at 2**-24 ~ 6e-8 relative. Measured here: losses, entropies and
grad norms agree to ~1e-7 relative; SFT weights to 6e-8 after 4 steps at lr 3e-3; GRPO weights to 6e-6 on 2
of ~50k weights (1e-7 on the rest) after 6 optimiser steps at lr 1e-3. Adam is why: it divides each
element's step by that element's own gradient scale, so an element whose gradient is a nearly cancelling
sum (an embedding row hit by tokens of opposite advantage) turns a last-bit change of the sum into a visible
fraction of lr. Worst of all is an element whose gradient cancels to below Adam's eps (1e-8): its first step
is lr * g / (|g| + eps), proportional to g itself, so float noise of g goes to the weight undamped, times
lr / eps. Measured with GRPO Unseen and behaviour log-probs: the first optimiser step's forward gives the
same log-probs bit for bit with 1 and 2 processes (the engine's old log-probs agree within 1e-6), the
gradients agree to 1.5e-8 absolute (4e-7 relative to each tensor's largest), yet one gate-projection element
whose gradient summed to -9.3e-10 (1 process) and -1.2e-9 (2 processes) took first steps of 8.5e-5 and
1.09e-4, and the final weights differ there by 2.4e-5.
The tests allow 1e-5 relative (1e-7 absolute) on logged losses, grad norms and the like, and 2e-5 absolute
on weights (2% of one Adam step at lr 1e-3, 3x the worst measured element outside that regime) on all but
`AMPLIFIED` elements, which must stay within 2e-4. A batch counted twice or dropped moves most weights by
~lr and fails that by 50x on thousands of elements; Adam hides a wrong loss scale from the weights, but not
from the logged loss and grad norm, checked at 1e-5. Rollouts (texts and rewards) must be equal. Resuming
with the same process count reproduces the run bit for bit and is checked exactly.

FSDP. torch 2.13's FSDP2 (`fully_shard`) trains on gloo with CPU tensors, but accelerate 1.15 only turns
FSDP on for GPU-like distributed types (its MULTI_CPU state never becomes FSDP). The FSDP test therefore
sets the accelerator state to FSDP2 itself in the launched script (`_ENTRY`, `PR1_TEST_FSDP`): what runs is
accelerate's FSDP code path (sharded state dicts through torch.distributed.checkpoint, DTensor parameters)
on CPU. `bench/gpu_check.py` runs the real `accelerate launch --use_fsdp` line on GPUs.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parallel_r1.checkpoint import checkpoint_info, latest_checkpoint
from parallel_r1.files import read_jsonl
from parallel_r1.trainer import final_model

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5  # losses, grad norms: relative (module docstring)
ATOL_WEIGHTS = 2e-5  # final weights: absolute
AMPLIFIED = 4  # weights of a run allowed past ATOL_WEIGHTS, Adam's eps regime (module docstring) ...
ATOL_AMPLIFIED = 2e-4  # ... and how far

# The launched script: `parallel-r1 <args>`, with two switches for the tests.
# PR1_TEST_HASH_REWARD=1: the reward of a response is +1 or -1 by a hash of its text. An untrained tiny
#   model never answers correctly, so every group would be dropped and GRPO would not update; this reward
#   varies within groups and is a pure function of the text, so equal rollouts get equal rewards.
# PR1_TEST_FSDP=1: the accelerator state is switched to FSDP2 (module docstring).
_ENTRY = """
import dataclasses, os, sys, zlib

from parallel_r1 import grpo, recipe, trainer
from parallel_r1.cli import main

if os.environ.get("PR1_TEST_HASH_REWARD") == "1":
    _score = grpo.score_batch

    def score_batch(texts, *args, **kwargs):
        scores = _score(texts, *args, **kwargs)
        return [
            dataclasses.replace(s, reward=1.0 if zlib.crc32(t.encode()) % 2 else -1.0) for s, t in zip(scores, texts)
        ]

    grpo.score_batch = score_batch

if os.environ.get("PR1_TEST_FSDP") == "1":
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    def make_accelerator(**kwargs):
        accelerator = trainer.make_accelerator(**kwargs)
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        state = AcceleratorState()
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            state_dict_type="SHARDED_STATE_DICT",
            cpu_ram_efficient_loading=False,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        )
        assert accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2
        return accelerator

    recipe.make_accelerator = make_accelerator

sys.exit(main(sys.argv[1:]))
"""

TINY = "{name_or_path: tiny, tiny: {hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 128}}"

SFT_STAGE = f"""
  - name: sft
    kind: sft
    variant: unseen
    model: {TINY}
    data: {{source: task, task_size: 40, eval_size: 8, prompt: question}}
    lr: 3.0e-3
    warmup_steps: 1
    save_every: 2
    max_steps: 4
    sft: {{batch_size: 2, grad_accum: 2, epochs: 1, bucket_batches: 4}}
"""


def _grpo_stage(variant: str, model: str | None = TINY, steps: int = 3) -> str:
    model_line = f"\n    model: {model}" if model else ""  # none: the previous stage's final model
    return f"""
  - name: grpo_{variant}
    kind: grpo
    variant: {variant}{model_line}
    data: {{source: task, task_size: 40, prompt: question}}
    lr: 1.0e-3
    warmup_steps: 0
    max_steps: {steps}
    save_every: 2
    grpo:
      prompts_per_step: 4
      n: 4
      mini_batch_size: 2
      micro_batch_size: 4
      rollout: {{max_response_tokens: 24, max_path_tokens: 8, max_blocks: 2, max_batch_size: 64}}
"""


def _recipe(tmp_path: Path, name: str, stages: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nseed: 5\nlogging: {{progress: false}}\nstages:{stages}")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(
    tmp_path: Path,
    config: Path,
    run_dir: Path,
    *,
    processes: int,
    launcher: str = "torchrun",
    overrides: tuple[str, ...] = (),
    env: dict | None = None,
) -> subprocess.Popen:
    """`parallel-r1 train` in `processes` processes (a session of its own, so a kill takes them all)."""
    entry, args = _train_command(tmp_path, config, run_dir, overrides)
    if processes == 1:
        cmd = [sys.executable, str(entry), *args]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        cmd += [str(entry), *args]
    else:  # accelerate
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={processes}"]
        cmd += [
            "--num_machines=1",
            "--mixed_precision=no",
            "--dynamo_backend=no",
            f"--main_process_port={_free_port()}",
        ]
        cmd += [str(entry), *args]
    return _start(cmd, env)


def _train_command(tmp_path: Path, config: Path, run_dir: Path, overrides=()) -> tuple[Path, list[str]]:
    """The test entry script (written to `tmp_path`) and the `train` arguments that follow it."""
    entry = tmp_path / "entry.py"
    entry.write_text(_ENTRY)
    args = ["train", "--config", str(config), "--run-dir", str(run_dir)]
    for item in overrides:
        args += ["--set", item]
    return entry, args


def _start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    """Start a launch command offline, one torch thread per process, in a session of its own."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    full_env.update(env or {})
    full_env.pop("WORLD_SIZE", None)
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish(*procs: subprocess.Popen, timeout: float = 600) -> None:
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-5000:]


def _run(tmp_path, config, run_dir, **kwargs) -> Path:
    _finish(_launch(tmp_path, config, run_dir, **kwargs))
    return run_dir


def _weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(final_model(stage_dir) / "model.safetensors")


def _assert_close_runs(a: Path, b: Path, keys: tuple[str, ...], exact: bool = False) -> None:
    """Stage folders `a` and `b` logged the same steps with the same `keys` and ended on the same weights."""
    rows_a, rows_b = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        assert ra["data_indices"] == rb["data_indices"]
        for key in keys:
            if key in ra or key in rb:
                if exact:
                    assert ra[key] == rb[key], (ra["step"], key)
                else:
                    assert ra[key] == pytest.approx(rb[key], rel=RTOL, abs=1e-7), (ra["step"], key)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    if exact:
        for name in wa:
            assert torch.equal(wa[name], wb[name]), name
        return
    beyond = {}
    for name in wa:
        diff = (wa[name] - wb[name]).abs()
        assert diff.max().item() <= ATOL_AMPLIFIED, (name, diff.max().item())
        beyond.update({(name, tuple(i.tolist())): diff[tuple(i)].item() for i in (diff > ATOL_WEIGHTS).nonzero()})
    assert len(beyond) <= AMPLIFIED, beyond


def test_sft_with_two_processes_equals_one_process(tmp_path):
    """The same global batch (2 x 2 rows vs 1 x 4 rows): same data order, losses, eval loss and weights;
    metrics written once; every process's RNG state in the checkpoint. Launched by `accelerate launch`."""
    config = _recipe(tmp_path, "sft", SFT_STAGE)
    two = _launch(tmp_path, config, tmp_path / "two", processes=2, launcher="accelerate")
    one = _launch(tmp_path, config, tmp_path / "one", processes=1, overrides=("stages.0.sft.batch_size=4",))
    _finish(two, one)
    a, b = tmp_path / "one" / "00-sft", tmp_path / "two" / "00-sft"
    _assert_close_runs(a, b, ("loss", "grad_norm", "eval_loss", "tokens", "lr"))
    assert len(read_jsonl(b / "metrics.jsonl")) == 4
    ckpt = final_model(b)
    assert checkpoint_info(ckpt)["num_processes"] == 2 and checkpoint_info(ckpt)["distributed_type"] == "MULTI_CPU"
    assert sorted(p.name for p in (ckpt / "accelerator").iterdir()) == [
        "optimizer.bin",
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert sorted(p.name for p in b.iterdir()) == ["DONE", "checkpoint-000002", "checkpoint-000004", "metrics.jsonl"]


@pytest.mark.parametrize("variant", ["seen", "unseen"])
def test_grpo_with_two_processes_equals_one_process(tmp_path, variant):
    """Each process samples its own prompts' groups (every prompt of a step sampled n times, by one process);
    rollouts, metrics and checkpoints are written once. The hf engine draws every sample from (step seed,
    problem index, sample index), so 2 processes sample exactly the rollouts of 1 process, and the losses and
    final weights agree to the float tolerance of the module docstring."""
    config = _recipe(tmp_path, "grpo", _grpo_stage(variant))
    env = {"PR1_TEST_HASH_REWARD": "1"}
    two = _launch(tmp_path, config, tmp_path / "two", processes=2, env=env)
    one = _launch(tmp_path, config, tmp_path / "one", processes=1, env=env)
    _finish(two, one)
    stage, single = tmp_path / "two" / f"00-grpo_{variant}", tmp_path / "one" / f"00-grpo_{variant}"
    rows = read_jsonl(stage / "metrics.jsonl")
    records = read_jsonl(stage / "rollouts.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert len(records) == 3 * 4 * 4  # steps x prompts x n, not twice that
    for row in rows:
        sampled = [r["problem_index"] for r in records if r["step"] == row["step"]]
        assert sorted(sampled) == sorted(row["data_indices"] * 4)
        assert row["optimizer_steps"] > 0
    assert sorted(p.name for p in stage.iterdir()) == [
        "DONE",
        "checkpoint-000002",
        "checkpoint-000003",
        "metrics.jsonl",
        "rollouts.jsonl",
    ]

    def samples(folder: Path) -> list[tuple]:
        found = [
            (r["step"], r["problem_index"], r["response"], r["reward"]) for r in read_jsonl(folder / "rollouts.jsonl")
        ]
        return sorted(found)

    assert samples(stage) == samples(single)
    keys = ("loss", "reward", "accuracy", "entropy", "clip_fraction", "grad_norm", "trained_tokens")
    _assert_close_runs(single, stage, keys)


def test_dynamic_sampling_with_two_processes_equals_one_process(tmp_path):
    """Refill rounds are split over the processes like a step's first round and the informative flags are
    gathered, so 2 processes sample the same rounds and train the same groups in the same mini-batches as 1."""
    refill = "      n: 2\n      dynamic_sampling: true\n      max_refill_rounds: 3\n"
    config = _recipe(tmp_path, "grpo", _grpo_stage("unseen").replace("      n: 4\n", refill))
    env = {"PR1_TEST_HASH_REWARD": "1"}
    two = _launch(tmp_path, config, tmp_path / "two", processes=2, env=env)
    one = _launch(tmp_path, config, tmp_path / "one", processes=1, env=env)
    _finish(two, one)
    stage, single = tmp_path / "two" / "00-grpo_unseen", tmp_path / "one" / "00-grpo_unseen"
    rows = read_jsonl(single / "metrics.jsonl")
    # With n = 2 about half the groups of the hash reward are uniform: the run must have refilled to test that.
    assert any(r["sampling_rounds"] > 1 for r in rows), "no step refilled: the test no longer tests refills"
    keys = ("sampling_rounds", "prompts_sampled", "groups_kept", "loss", "reward", "grad_norm", "trained_tokens")
    _assert_close_runs(single, stage, keys)


KILL_STAGES = SFT_STAGE + _grpo_stage("unseen", model=None, steps=4)


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_same_result(tmp_path):
    """An SFT stage then a GRPO stage with 2 processes; the whole process group is SIGKILLed once the GRPO
    stage has a checkpoint, and the same command resumes: every step logged once, with the same values, and
    the same final weights as an uninterrupted run (bit for bit: same process count, same operations)."""
    config = _recipe(tmp_path, "kill", KILL_STAGES)
    env = {"PR1_TEST_HASH_REWARD": "1"}
    ref = _launch(tmp_path, config, tmp_path / "ref", processes=2, env=env)
    victim = _launch(tmp_path, config, tmp_path / "killed", processes=2, env=env)
    stage = tmp_path / "killed" / "01-grpo_unseen"
    deadline = time.time() + 400
    while latest_checkpoint(stage) is None:
        assert victim.poll() is None, victim.stderr.read()[-5000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (stage / "DONE").exists() and latest_checkpoint(stage).name == "checkpoint-000002"

    _finish(_launch(tmp_path, config, tmp_path / "killed", processes=2, env=env), ref)
    for name in ("00-sft", "01-grpo_unseen"):
        _assert_close_runs(tmp_path / "ref" / name, tmp_path / "killed" / name, ("loss", "reward"), exact=True)
    texts = [r["response"] for r in read_jsonl(stage / "rollouts.jsonl")]
    assert texts == [r["response"] for r in read_jsonl(tmp_path / "ref" / "01-grpo_unseen" / "rollouts.jsonl")]


@pytest.mark.slow
def test_fsdp_with_two_processes_resumes_exactly_and_saves_a_plain_model_folder(tmp_path):
    """FSDP2 on 2 CPU processes (module docstring): the optimizer and model are saved as shards through
    torch.distributed.checkpoint, the stage's model as one Hugging Face folder; resuming from the middle
    checkpoint ends bit for bit on the uninterrupted run, which itself matches DDP."""
    config = _recipe(tmp_path, "fsdp", SFT_STAGE)
    env = {"PR1_TEST_FSDP": "1"}
    ddp = _launch(tmp_path, config, tmp_path / "ddp", processes=2)
    fsdp = _launch(tmp_path, config, tmp_path / "fsdp", processes=2, env=env)
    _finish(fsdp, ddp)
    stage = tmp_path / "fsdp" / "00-sft"
    ckpt = final_model(stage)
    assert checkpoint_info(ckpt)["distributed_type"] == "FSDP"
    shards = {p.name for p in (ckpt / "accelerator").iterdir()}
    assert {"optimizer_0", "pytorch_model_fsdp_0", "random_states_0.pkl", "random_states_1.pkl"} <= shards
    assert len(list((ckpt / "accelerator" / "optimizer_0").glob("*.distcp"))) == 2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as save_pretrained writes it
    _assert_close_runs(tmp_path / "ddp" / "00-sft", stage, ("loss", "grad_norm", "eval_loss"))

    # Resume from checkpoint 2 as after a crash between checkpoints 2 and 4.
    resumed = tmp_path / "resumed" / "00-sft"
    resumed.mkdir(parents=True)
    import shutil

    shutil.copytree(stage / "checkpoint-000002", resumed / "checkpoint-000002")
    (resumed / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in read_jsonl(stage / "metrics.jsonl")[:2])
    )
    _run(tmp_path, config, tmp_path / "resumed", processes=2, env=env)
    _assert_close_runs(stage, resumed, ("loss", "grad_norm", "eval_loss"), exact=True)


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_gpu_check_has_help_and_says_clearly_that_it_needs_cuda():
    shown = _gpu_check("--help")
    assert shown.returncode == 0 and "--skip-launch" in shown.stdout and "--device" in shown.stdout
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    refused = _gpu_check()
    assert refused.returncode == 2
    assert "no CUDA device" in refused.stderr and "--device cpu" in refused.stderr
