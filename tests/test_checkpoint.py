import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, get_scheduler

from parallel_r1.checkpoint import (
    TrainerState,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from parallel_r1.metrics import read_jsonl
from parallel_r1.trainer import final_model

ROOT = Path(__file__).resolve().parents[1]


def _optimised(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)
    ids = torch.randint(0, 100, (2, 8))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return optimizer, scheduler


def test_checkpoint_round_trip(tmp_path, tiny_model, tiny_tokenizer):
    accelerator = Accelerator(cpu=True)
    optimizer, scheduler = _optimised(tiny_model)
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

    fresh_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh_sched = get_scheduler("cosine", fresh_opt, num_warmup_steps=2, num_training_steps=10)
    torch.manual_seed(123)  # scramble the RNG; loading must restore the saved state
    loaded = load_checkpoint(path, accelerator=accelerator, optimizer=fresh_opt, scheduler=fresh_sched)
    assert loaded == state
    assert torch.equal(torch.rand(4), expected_draw)
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()
    saved, restored = optimizer.state_dict(), fresh_opt.state_dict()
    for key in saved["state"]:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved["state"][key][field], restored["state"][key][field])


def test_keep_last_and_unfinished_checkpoints_are_ignored(tmp_path, tiny_model, tiny_tokenizer):
    accelerator = Accelerator(cpu=True)
    optimizer, scheduler = _optimised(tiny_model)
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
