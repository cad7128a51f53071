"""DeepSpeed ZeRO-2 and ZeRO-3 for real: `parallel-r1 train` on 2 CPU processes over gloo.

Skipped where DeepSpeed is not installed (`pip install parallel-r1[deepspeed]`; CI does not install it).

Launchers. `accelerate launch --use_deepspeed --zero_stage N --num_processes 2` is the user's line; it starts
torchrun with ACCELERATE_USE_DEEPSPEED and ACCELERATE_DEEPSPEED_ZERO_STAGE set, which the other tests set
on `torchrun` themselves. On a machine without GPUs accelerate 1.16 records one process on every rank under
DeepSpeed; `trainer.make_accelerator` fixes that (its docstring), and nothing else is switched by the tests:
the run is accelerate's own DeepSpeed path, `deepspeed.initialize` with the stage's torch AdamW.

Tolerance. 1 process (no DeepSpeed) and 2 DeepSpeed processes with the same global batch compute the same
sums in another order: ZeRO reduce-scatters the two processes' gradients (averaged, as DDP does) into each
process's shard, which Adam then steps. The tolerances are test_distributed's (1e-5 relative, 1e-7 absolute
on logged losses and grad norms, 2e-5 absolute on weights; its docstring justifies them). Measured here:
SFT weights to 6e-8 (ZeRO-2) and 8e-8 (ZeRO-3) after 4 steps of a cosine schedule from lr 3e-3, GRPO
weights to 8.2e-6 after 6 optimiser steps at lr 1e-3 with both stages, losses and grad norms to 2e-6
relative (a GRPO loss of 4e-4 to 2e-5 relative, 1e-8 absolute). Rollouts (texts and rewards) must be
equal: under ZeRO-3 the rollout engine samples from the gathered weights (`trainer.full_weights`). Resuming
with the same process count and stage reproduces the run bit for bit and is checked exactly.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from test_distributed import (  # noqa: E402
    SFT_STAGE,
    _assert_close_runs,
    _finish,
    _free_port,
    _grpo_stage,
    _launch,
    _recipe,
    _start,
    _train_command,
)

from parallel_r1.checkpoint import checkpoint_info, latest_checkpoint  # noqa: E402
from parallel_r1.files import read_jsonl  # noqa: E402
from parallel_r1.trainer import final_model  # noqa: E402

HASH_REWARD = {"PR1_TEST_HASH_REWARD": "1"}  # test_distributed's reward by a hash of the text
GRPO_KEYS = ("loss", "reward", "accuracy", "entropy", "clip_fraction", "grad_norm", "trained_tokens")


def _zero_env(zero: int) -> dict:
    """What `accelerate launch --use_deepspeed --zero_stage N` sets for the processes it starts."""
    return {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(zero)}


def _launch_zero(
    tmp_path: Path, config: Path, run_dir: Path, zero: int, *, launcher="torchrun", overrides=(), env=None
) -> subprocess.Popen:
    """`parallel-r1 train` on 2 DeepSpeed processes, by torchrun or by the `accelerate launch` line."""
    if launcher == "torchrun":
        env = {**_zero_env(zero), **(env or {})}
        return _launch(tmp_path, config, run_dir, processes=2, overrides=overrides, env=env)
    entry, args = _train_command(tmp_path, config, run_dir, overrides)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", f"--zero_stage={zero}"]
    cmd += ["--num_processes=2", "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no"]
    cmd += [f"--main_process_port={_free_port()}", str(entry), *args]
    return _start(cmd, env)


def _check_deepspeed_checkpoint(ckpt: Path, zero: int) -> None:
    """A DeepSpeed checkpoint of 2 processes: each its optimizer shard, and one plain Hugging Face folder."""
    info = checkpoint_info(ckpt)
    assert info["distributed_type"] == "DEEPSPEED" and info["num_processes"] == 2
    shards = ckpt / "accelerator" / "pytorch_model"
    assert {p.name for p in shards.glob("*optim_states.pt")} == {
        f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)
    }
    ds_config = torch.load(next(shards.glob("*optim_states.pt")), map_location="cpu", weights_only=False)["ds_config"]
    assert ds_config["zero_optimization"]["stage"] == zero
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as save_pretrained writes it


@pytest.mark.parametrize("zero", [2, 3])
def test_sft_with_zero_on_two_processes_equals_one_process(tmp_path, zero):
    """SFT (Unseen, grad_accum 2, a cosine schedule) with the same global batch (2 x 2 rows vs 1 x 4 rows):
    same data order, learning rates, losses, grad norms, eval loss and weights as one process without DeepSpeed;
    the checkpoints hold DeepSpeed's shards and a Hugging Face folder from the gathered weights. ZeRO-3
    through `accelerate launch`."""
    config = _recipe(tmp_path, "sft", SFT_STAGE)
    # A schedule that moves every step: the trainer steps it, DeepSpeed's optimizer must take its rate.
    cosine = ("stages.0.lr_schedule=cosine",)
    launcher = "accelerate" if zero == 3 else "torchrun"
    two = _launch_zero(tmp_path, config, tmp_path / "two", zero, launcher=launcher, overrides=cosine)
    one = _launch(tmp_path, config, tmp_path / "one", processes=1, overrides=("stages.0.sft.batch_size=4", *cosine))
    _finish(two, one)
    a, b = tmp_path / "one" / "00-sft", tmp_path / "two" / "00-sft"
    _assert_close_runs(a, b, ("loss", "grad_norm", "eval_loss", "tokens", "lr"))
    rows = read_jsonl(b / "metrics.jsonl")
    assert len(rows) == 4 and len({row["lr"] for row in rows}) == 4
    _check_deepspeed_checkpoint(final_model(b), zero)
    assert sorted(p.name for p in b.iterdir()) == ["DONE", "checkpoint-000002", "checkpoint-000004", "metrics.jsonl"]


@pytest.mark.parametrize("zero", [2, 3])
def test_grpo_with_zero_on_two_processes_equals_one_process(tmp_path, zero):
    """GRPO (Unseen, 2 optimiser steps per step): the same rollouts, losses and weights as one process."""
    config = _recipe(tmp_path, "grpo", _grpo_stage("unseen"))
    two = _launch_zero(tmp_path, config, tmp_path / "two", zero, env=HASH_REWARD)
    one = _launch(tmp_path, config, tmp_path / "one", processes=1, env=HASH_REWARD)
    _finish(two, one)
    stage, single = tmp_path / "two" / "00-grpo_unseen", tmp_path / "one" / "00-grpo_unseen"

    def samples(folder: Path) -> list[tuple]:
        rows = read_jsonl(folder / "rollouts.jsonl")
        return sorted((r["step"], r["problem_index"], r["response"], r["reward"]) for r in rows)

    assert len(samples(stage)) == 3 * 4 * 4 and samples(stage) == samples(single)
    assert all(row["optimizer_steps"] == 2 for row in read_jsonl(stage / "metrics.jsonl"))
    _assert_close_runs(single, stage, GRPO_KEYS)
    _check_deepspeed_checkpoint(final_model(stage), zero)


KILL_STAGES = SFT_STAGE + _grpo_stage("unseen", model=None, steps=4)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_a_killed_zero_run_resumes_bit_for_bit(tmp_path, zero):
    """SFT then GRPO on 2 DeepSpeed processes; the process group is SIGKILLed once the GRPO stage has a
    checkpoint, and the same command resumes from DeepSpeed's shards: every step logged once with the same
    values, the same rollouts and the same final weights as an uninterrupted run, bit for bit."""
    config = _recipe(tmp_path, "kill", KILL_STAGES)
    ref = _launch_zero(tmp_path, config, tmp_path / "ref", zero, env=HASH_REWARD)
    victim = _launch_zero(tmp_path, config, tmp_path / "killed", zero, env=HASH_REWARD)
    stage = tmp_path / "killed" / "01-grpo_unseen"
    deadline = time.time() + 400
    while latest_checkpoint(stage) is None:
        assert victim.poll() is None, victim.stderr.read()[-5000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (stage / "DONE").exists() and latest_checkpoint(stage).name == "checkpoint-000002"

    _finish(_launch_zero(tmp_path, config, tmp_path / "killed", zero, env=HASH_REWARD), ref)
    for name in ("00-sft", "01-grpo_unseen"):
        _assert_close_runs(tmp_path / "ref" / name, tmp_path / "killed" / name, GRPO_KEYS + ("eval_loss",), exact=True)
    texts = [r["response"] for r in read_jsonl(stage / "rollouts.jsonl")]
    assert texts == [r["response"] for r in read_jsonl(tmp_path / "ref" / "01-grpo_unseen" / "rollouts.jsonl")]
    _check_deepspeed_checkpoint(final_model(stage), zero)


def test_zero3_refuses_the_grpo_settings_that_read_weights_outside_the_gather(tmp_path):
    """vLLM rollouts and a KL reference read a ZeRO-3 model's weights where they are
    sharded: `configure_deepspeed` names each one instead of letting a process fail or train on stale weights."""
    from types import SimpleNamespace

    from parallel_r1.config import load_recipe
    from parallel_r1.settings import ConfigError
    from parallel_r1.trainer import configure_deepspeed, zero3_grpo_gaps

    stage = load_recipe(_recipe(tmp_path, "plain", _grpo_stage("unseen"))).stages[0]
    assert zero3_grpo_gaps(stage) == []
    stage.grpo.rollout.backend, stage.grpo.kl_coef = "vllm", 0.1
    gaps = zero3_grpo_gaps(stage)
    assert [gap.split()[0] for gap in gaps] == ["rollout.backend", "kl_coef"]
    # A recipe setting the launch cannot serve is an input error: the CLI prints it as one `error:` line.
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 3}})
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=2)
    with pytest.raises(ConfigError, match="under DeepSpeed ZeRO-3 .*rollout.backend vllm"):
        configure_deepspeed(accelerator, stage)
