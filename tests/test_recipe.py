import shutil

import torch
from safetensors.torch import load_file

from parallel_r1.analysis import read_rollouts
from parallel_r1.cli import main
from parallel_r1.config import parse_recipe
from parallel_r1.files import read_jsonl
from parallel_r1.models import load_model_and_tokenizer
from parallel_r1.recipe import run_recipe
from parallel_r1.trainer import final_model

MODEL = "{name_or_path: tiny, tiny: {hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 128}}"

TWO_SFT = f"""
name: chain
logging: {{progress: false}}
stages:
  - name: first
    kind: sft
    model: {MODEL}
    data: {{source: task, task_size: 16, prompt: question}}
    lr: 1.0e-2
    sft: {{batch_size: 8}}
  - name: second
    kind: sft
    data: {{source: task, task_size: 8, prompt: question}}
    lr: 1.0e-30
    sft: {{batch_size: 8}}
"""


def test_stages_chain_and_finished_stages_are_skipped(tmp_path):
    recipe = parse_recipe(TWO_SFT)
    stages = run_recipe(recipe, tmp_path)
    assert [(s.name, s.kind, s.folder.name) for s in stages] == [
        ("first", "sft", "00-first"),
        ("second", "sft", "01-second"),
    ]
    assert all(not s.skipped and s.seconds >= 0 for s in stages)
    assert [s.model for s in stages] == [final_model(tmp_path / "00-first"), final_model(tmp_path / "01-second")]
    assert stages[1].metrics == read_jsonl(tmp_path / "01-second" / "metrics.jsonl")[-1]
    final = stages[-1].model
    first = load_file(final_model(tmp_path / "00-first") / "model.safetensors")
    second = load_file(final / "model.safetensors")
    assert final.parent.name == "01-second"
    # With a vanishing learning rate the second stage ends where the first ended: it started there,
    # not from a fresh tiny model.
    for name in first:
        assert torch.allclose(first[name], second[name], atol=1e-6), name
    init, _ = load_model_and_tokenizer("tiny", tiny_kwargs=recipe.stages[0].model.tiny.__dict__)
    init_weights = init.state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(init_weights[name], second[name])
    assert (tmp_path / "recipe.yaml").is_file()

    metrics = (tmp_path / "01-second" / "metrics.jsonl").read_text()
    again = run_recipe(recipe, tmp_path)  # both stages are done: nothing runs again, and both are reported
    assert all(s.skipped for s in again)
    assert [(s.model, s.metrics) for s in again] == [(s.model, s.metrics) for s in stages]
    assert (tmp_path / "01-second" / "metrics.jsonl").read_text() == metrics


GRPO_RECIPE = f"""
name: rl
seed: 1
logging: {{progress: false}}
stages:
  - name: rl
    kind: grpo
    variant: unseen
    model: {MODEL}
    data: {{source: task, task_size: 16, prompt: question}}
    lr: 1.0e-3
    max_steps: 2
    save_every: 1
    keep_last: 3
    grpo:
      prompts_per_step: 2
      n: 4
      mini_batch_size: 1
      rollout: {{max_response_tokens: 24, max_path_tokens: 8}}
      reward: {{kind: alternating, window: 2, parallel_steps: 1, wrong_value: -0.5, parallel_value: 3.0}}
"""


def test_grpo_stage_from_the_cli_logs_metrics_and_rollouts_and_resumes_exactly(tmp_path):
    config = tmp_path / "rl.yaml"
    config.write_text(GRPO_RECIPE)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--run-dir", str(run), "--set", "stages.rl.grpo.n=3"]) == 0
    stage = run / "00-rl"
    rows = read_jsonl(stage / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for key in (
        "reward",
        "reward_accuracy",
        "reward_parallel_bonus",
        "accuracy",
        "parallel_ratio",
        "blocks_per_response",
        "response_length",
        "path_length",
        "entropy",
        "clip_fraction",
        "grad_norm",
        "tokens_per_s",
        "data_indices",
    ):
        assert key in rows[0], key
    assert [r["parallel_active"] for r in rows] == [0.0, 1.0]  # alternating 1 of 2, last step of each window
    assert len(rows[0]["data_indices"]) == 2 and not set(rows[0]["data_indices"]) & set(rows[1]["data_indices"])
    rollouts = read_jsonl(stage / "rollouts.jsonl")
    assert len(rollouts) == 2 * 2 * 3  # steps x prompts x n (the --set override)
    assert {"response", "reward", "pred", "gold", "question", "num_blocks", "well_formed", "step"} <= set(rollouts[0])
    # Whatever the sampler drew, each reward is what the recipe's values give that response: wrong_value
    # -0.5, correct_value 1.0, parallel_value 3.0 for a correct well-formed block on the parallel step (2),
    # and on that step at most format_error_value (-1) for a response that fails the format check.
    for r in rollouts:
        parallel = r["step"] == 2
        want = (3.0 if parallel and r["num_blocks"] and r["well_formed"] else 1.0) if r["correct"] else -0.5
        assert r["reward"] == (min(want, -1.0) if parallel and not r["well_formed"] else want), r
    # `parallel-r1 analyze` and `view` read the stage folder as it is
    assert [r["response"] for r in read_rollouts([stage])] == [r["response"] for r in rollouts]

    # Lose the last step (as if killed right after checkpoint 1) and run again: step 2 is re-sampled
    # from the same data with the same seed and logged once.
    first_pass = [r for r in rollouts if r["step"] == 2]
    shutil.rmtree(stage / "checkpoint-000002")
    (stage / "DONE").unlink()
    assert main(["train", "--config", str(config), "--run-dir", str(run), "--set", "stages.rl.grpo.n=3"]) == 0
    again = read_jsonl(stage / "rollouts.jsonl")
    assert len(again) == len(rollouts)
    assert [r["response"] for r in again if r["step"] == 2] == [r["response"] for r in first_pass]
    assert read_jsonl(stage / "metrics.jsonl")[1]["data_indices"] == rows[1]["data_indices"]
