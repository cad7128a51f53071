import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, get_scheduler

from parallel_r1.checkpoint import (
    CheckpointError,
    TrainerState,
    checkpoint_info,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from parallel_r1.files import read_jsonl
from parallel_r1.trainer import final_model

ROOT = Path(__file__).resolve().parents[1]


def _optimised(model, accelerator):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)
    model, optimizer = accelerator.prepare(model, optimizer)
    ids = torch.randint(0, 100, (2, 8))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return optimizer, scheduler


def test_checkpoint_round_trip(tmp_path, tiny_model, tiny_tokenizer):
    accelerator = Accelerator(cpu=True)
    optimizer, scheduler = _optimised(tiny_model, accelerator)
    state = TrainerState(step=3, epoch=1, index=5, data_seed=7, extra={"best": 1.5})
    path = save_checkpoint(
        tmp_path,
        state,
        accelerator=accelerator,
        model=tiny_model,
        tokenizer=tiny_tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
    )
    expected_draw = torch.rand(4)
    assert path.name == "checkpoint-000003" and latest_checkpoint(tmp_path) == path

    # Model and tokenizer load back in Hugging Face format, special tokens included.
    model = AutoModelForCausalLM.from_pretrained(path)
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    assert tok.encode("<Parallel><Path>", add_special_tokens=False) == tiny_tokenizer.encode(
        "<Parallel><Path>", add_special_tokens=False
    )

    # The optimizer state, every process's RNG and (sharded runs only) the model's shards go through
    # accelerate's save_state; the full weights are the Hugging Face folder's alone.
    assert sorted(p.name for p in (path / "accelerator").iterdir()) == ["optimizer.bin", "random_states_0.pkl"]
    assert checkpoint_info(path)["num_processes"] == 1 and checkpoint_info(path)["format"] == 2

    fresh_acc = Accelerator(cpu=True)
    fresh_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh_sched = get_scheduler("cosine", fresh_opt, num_warmup_steps=2, num_training_steps=10)
    model, fresh_opt = fresh_acc.prepare(model, fresh_opt)
    torch.manual_seed(123)  # scramble the RNG; loading must restore the saved state
    loaded = load_checkpoint(path, accelerator=fresh_acc, optimizer=fresh_opt, scheduler=fresh_sched)
    assert loaded == state
    assert torch.equal(torch.rand(4), expected_draw)
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()
    saved, restored = optimizer.state_dict(), fresh_opt.state_dict()
    for key in saved["state"]:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved["state"][key][field], restored["state"][key][field])


def test_keep_last_and_unfinished_checkpoints_are_ignored(tmp_path, tiny_model, tiny_tokenizer):
    accelerator = Accelerator(cpu=True)
    optimizer, scheduler = _optimised(tiny_model, accelerator)
    for step in (2, 4, 6):
        save_checkpoint(
            tmp_path,
            TrainerState(step=step),
            accelerator=accelerator,
            model=tiny_model,
            tokenizer=tiny_tokenizer,
            optimizer=optimizer,
            scheduler=scheduler,
            keep_last=2,
        )
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000004", "checkpoint-000006"]
    # A kill mid-write leaves a .tmp folder, or (before the state file) a folder without state.
    (tmp_path / "checkpoint-000008.tmp").mkdir()
    (tmp_path / "checkpoint-000010").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-000006"


KILL_RECIPE = """
name: kill-test
seed: 3
logging: {progress: false}
stages:
  - name: sft
    kind: sft
    variant: unseen
    model: {name_or_path: tiny, tiny: {hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 128}}
    data: {source: task, task_size: 60, prompt: question}
    lr: 3.0e-3
    lr_schedule: cosine
    warmup_steps: 3
    save_every: 4
    keep_last: 2
    sft: {batch_size: 4, grad_accum: 1, epochs: 3, bucket_batches: 4}
"""


def _train(config: Path, run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "parallel_r1.cli", "train", "--config", str(config), "--run-dir", str(run_dir)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _weights(run_dir: Path) -> dict:
    return load_file(final_model(run_dir / "00-sft") / "model.safetensors")


def test_a_killed_run_resumes_without_repeating_or_skipping_data(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text(KILL_RECIPE)
    total = 45  # 60 records, batches of 4, 3 epochs

    # Uninterrupted reference run, and the run that gets killed, side by side.
    ref = _train(config, tmp_path / "ref")
    killed_dir = tmp_path / "killed"
    victim = _train(config, killed_dir)
    stage = killed_dir / "00-sft"
    deadline = time.time() + 300
    while latest_checkpoint(stage) is None:
        assert victim.poll() is None, victim.stderr.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = latest_checkpoint(stage)
    assert not (stage / "DONE").exists() and killed_at.name == "checkpoint-000004"

    resumed = _train(config, killed_dir)
    for proc in (resumed, ref):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err

    rows = read_jsonl(stage / "metrics.jsonl")
    ref_rows = read_jsonl(tmp_path / "ref" / "00-sft" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    order = [i for r in rows for i in r["data_indices"]]
    assert order == [i for r in ref_rows for i in r["data_indices"]]
    # Each record once per epoch: nothing repeated, nothing skipped.
    assert len(order) == 180
    for epoch in range(3):
        assert sorted(order[epoch * 60 : (epoch + 1) * 60]) == list(range(60))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]

    a, b = _weights(killed_dir), _weights(tmp_path / "ref")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name
    assert json.loads((final_model(stage) / "trainer_state.json").read_text())["step"] == total


def test_the_optimizer_must_be_the_prepared_one(tmp_path, tiny_model, tiny_tokenizer):
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    scheduler = get_scheduler("constant", optimizer)
    with pytest.raises(ValueError, match="accelerator.prepare"):
        save_checkpoint(
            tmp_path,
            TrainerState(step=1),
            accelerator=Accelerator(cpu=True),
            model=tiny_model,
            tokenizer=tiny_tokenizer,
            optimizer=optimizer,
            scheduler=scheduler,
        )


def _to_first_format(path: Path) -> None:
    """Rewrite a checkpoint as the first format wrote it: optimizer.pt, rng_state_<process>.pt, no
    accelerator/ folder, no metadata in trainer_state.json."""
    acc_dir = path / "accelerator"
    shutil.move(acc_dir / "optimizer.bin", path / "optimizer.pt")
    rng = torch.load(acc_dir / "random_states_0.pkl", weights_only=False)
    first = {"python": rng["random_state"], "numpy": rng["numpy_random_seed"], "torch": rng["torch_manual_seed"]}
    torch.save(first, path / "rng_state_0.pt")
    shutil.rmtree(acc_dir)
    info = checkpoint_info(path)
    for key in ("format", "num_processes", "distributed_type"):
        info.pop(key)
    (path / "trainer_state.json").write_text(json.dumps(info))


RESUME_RECIPE = """
name: first-format
seed: 3
logging: {progress: false}
stages:
  - name: sft
    kind: sft
    variant: seen
    model: {name_or_path: tiny, tiny: {hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 128}}
    data: {source: task, task_size: 30, eval_size: 6, prompt: question}
    lr: 3.0e-3
    warmup_steps: 1
    save_every: 2
    keep_last: 3
    max_steps: 4
    sft: {batch_size: 4, grad_accum: 1, epochs: 1, bucket_batches: 4}
"""


def test_checkpoints_of_the_first_format_still_resume_exactly(tmp_path):
    """A run folder written before checkpoints went through accelerate's save_state resumes exactly."""
    from parallel_r1.config import parse_recipe
    from parallel_r1.recipe import run_recipe

    recipe = parse_recipe(RESUME_RECIPE)
    run_recipe(recipe, tmp_path / "ref")
    stage = tmp_path / "ref" / "00-sft"
    old = tmp_path / "old" / "00-sft"
    old.mkdir(parents=True)
    shutil.copytree(stage / "checkpoint-000002", old / "checkpoint-000002")
    _to_first_format(old / "checkpoint-000002")
    rows = read_jsonl(stage / "metrics.jsonl")
    (old / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    run_recipe(recipe, tmp_path / "old")
    untimed = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731
    assert untimed(read_jsonl(old / "metrics.jsonl")) == untimed(rows)
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "old")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (final_model(old) / "accelerator").is_dir()  # new checkpoints are written in the current format


def test_unresumable_checkpoints_fail_with_a_clear_message(tmp_path):
    from types import SimpleNamespace

    from parallel_r1.checkpoint import ACCELERATOR_DIR

    fsdp = SimpleNamespace(distributed_type="DistributedType.FSDP", num_processes=2, process_index=0)
    first = tmp_path / "checkpoint-000002"
    first.mkdir()
    (first / "trainer_state.json").write_text(json.dumps({"step": 2}))
    (first / "optimizer.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="first format.*FSDP.*one process or DDP"):
        load_checkpoint(first, accelerator=fsdp, optimizer=None, scheduler=None)

    ddp_written = tmp_path / "checkpoint-000004"
    (ddp_written / ACCELERATOR_DIR).mkdir(parents=True)
    (ddp_written / "trainer_state.json").write_text(json.dumps({"step": 4, "distributed_type": "MULTI_GPU"}))
    with pytest.raises(CheckpointError, match="written by a MULTI_GPU run and this run is FSDP"):
        load_checkpoint(ddp_written, accelerator=fsdp, optimizer=None, scheduler=None)

    empty = tmp_path / "checkpoint-000006"
    empty.mkdir()
    (empty / "trainer_state.json").write_text(json.dumps({"step": 6}))
    with pytest.raises(CheckpointError, match="neither accelerator/ nor optimizer.pt"):
        load_checkpoint(empty, accelerator=fsdp, optimizer=None, scheduler=None)
