"""`parallel-r1 study`: arms at equal budget, shared SFT, seeds, ablations, summary, resumption, sweep."""

import json
import math
from dataclasses import replace

import pytest

from parallel_r1 import study
from parallel_r1.config import ConfigError
from parallel_r1.report import read_evidence
from parallel_r1.settings import STUDY_RECIPES, EvalSettings, StudySettings

# A study small enough for a test: a few SFT and RL steps, two problems per level, one sample each.
QUICK = [
    "stages.sft.max_steps=4",
    "stages.sft.save_every=4",
    "stages.sft.data.task_size=64",
] + [
    f"stages.{stage}.{key}"
    for stage in ("rl_easy", "rl_hard")
    for key in (
        "max_steps=2",
        "save_every=1",
        "data.task_size=16",
        "grpo.prompts_per_step=2",
        "grpo.n=2",
        "grpo.mini_batch_size=2",
        "grpo.rollout.max_response_tokens=48",
    )
]
QUICK_EVAL = EvalSettings(problems_per_level=2, levels=(2, 3), k=1, batch_size=16)


def test_mean_and_standard_error():
    mean, se = study.mean_se([0.2, 0.4, 0.6])
    assert mean == pytest.approx(0.4)
    assert se == pytest.approx(0.2 / math.sqrt(3))
    assert study.mean_se([0.5]) == (0.5, 0.0)


def test_compare_flags_only_differences_beyond_two_standard_errors():
    clear = study.compare([0.60, 0.62, 0.61], [0.40, 0.41, 0.39])
    assert clear["significant"] and clear["diff"] == pytest.approx(0.21)
    noisy = study.compare([0.5, 0.7, 0.3], [0.45, 0.55, 0.35])
    assert not noisy["significant"]


def test_arms_have_equal_rl_budgets_and_unseen_arms_share_their_sft():
    recipes = study.load_arms(StudySettings(), [])
    assert list(recipes) == list(study.ARMS)
    keys = {arm: study.sft_key(r) for arm, r in recipes.items()}
    assert keys["unseen_s1"] == keys["unseen_s2"] == keys["mid_training"]
    assert len({keys["sequential"], keys["seen"], keys["unseen_s1"], keys["threads"]}) == 4
    assert len({str(study.rl_budget(r)) for r in recipes.values()}) == 1
    assert not study.is_parallel(recipes["sequential"])
    assert all(study.is_parallel(recipes[a]) for a in study.ARMS if a != "sequential")


def test_a_different_rl_budget_is_refused(tmp_path):
    (tmp_path / "sequential.yaml").write_text(f"extends: {STUDY_RECIPES / 'sequential.yaml'}\n")
    (tmp_path / "seen.yaml").write_text(
        f"extends: {STUDY_RECIPES / 'seen.yaml'}\nstages:\n  - {{name: rl_easy, max_steps: 21}}\n"
    )
    settings = StudySettings(arms=("sequential", "seen"), recipes_dir=tmp_path)
    with pytest.raises(ConfigError, match="different RL budgets"):
        study.load_arms(settings, [])


def test_evaluations_per_arm():
    recipes = study.load_arms(StudySettings(), [])
    assert list(study.eval_variants(recipes["sequential"])) == ["heldout"]
    assert list(study.eval_variants(recipes["seen"])) == ["heldout", "no_blocks"]
    assert study.eval_variants(recipes["unseen_s1"]) == {
        "heldout": {},
        "no_blocks": {"max_blocks": 0},
        "seen_attention": {"variant": "seen"},
    }
    assert study.eval_variants(recipes["threads"]) == study.eval_variants(recipes["unseen_s1"])


def test_oracle_counts_paths_and_blocks_that_reach_the_answer():
    hit = "<Path>7*3=21\n21+10=31\n31 vs 31: 7 works</Path>"
    miss = "<Path>4*3=12\n12+10=22\n22 vs 31: 4 fails</Path>"
    block = "<Parallel>{}{}</Parallel><Summary>s</Summary>"
    samples = [
        {"response": block.format(hit, miss) + "Final Answer: 7", "gold": "7"},
        {"response": block.format(miss, miss) + "Final Answer: 4", "gold": "7"},
    ]
    figure = study.oracle(samples, "search")
    assert figure == {"single_path": 0.25, "best_of_block": 0.5, "blocks": 2}
    assert study.oracle([{"response": "Final Answer: 7", "gold": "7"}], "search") is None


@pytest.mark.slow
def test_study_runs_resumes_and_reports(tmp_path):
    settings = StudySettings(arms=("sequential", "unseen_s1", "unseen_s2"), seeds=(0, 1), eval=QUICK_EVAL)
    report = study.run_study(tmp_path, settings, QUICK)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert read_evidence(report)["arms"].keys() == summary["arms"].keys()
    # Unseen S1 and S2 start from one shared SFT model; the baseline from its own.
    assert len(list((tmp_path / "sft").iterdir())) == 2
    for arm in settings.arms:
        entry = summary["arms"][arm]
        assert sorted(entry["seeds"]) == ["0", "1"]
        assert entry["stats"]["heldout"]["n"] == 2
        assert "heldout" in entry["sft"]
    assert "no_blocks" in summary["arms"]["unseen_s1"]["stats"]
    assert "seen_attention" in summary["arms"]["unseen_s2"]["stats"]
    assert "no_blocks" not in summary["arms"]["sequential"]["stats"]
    assert "vs_baseline" in summary["arms"]["unseen_s1"]
    table = (tmp_path / "study.md").read_text()
    assert all(f"| {arm} |" in table for arm in settings.arms)
    # The two seeds trained differently (their RL problems and sampling differ).
    seeds = summary["arms"]["unseen_s1"]["seeds"]
    assert seeds["0"]["train_generated_tokens"] > 0 and seeds["1"]["train_generated_tokens"] > 0

    # Resuming retrains nothing and re-evaluates nothing.
    stamps = {p: p.stat().st_mtime for p in tmp_path.rglob("DONE")} | {
        p: p.stat().st_mtime for p in tmp_path.rglob("eval/*.json")
    }
    study.run_study(tmp_path, settings, QUICK)
    assert {p: p.stat().st_mtime for p in stamps} == stamps


@pytest.mark.slow
def test_sweep_scores_learning_rates_on_validation_problems_only(tmp_path):
    settings = StudySettings(arms=("sequential", "seen"), seeds=(0,), eval=QUICK_EVAL)
    result = study.run_sweep(tmp_path, settings, QUICK, lrs=(1e-4, 3e-4))
    assert set(result["validation"]) == {"sequential", "seen"}
    assert all(set(row) == {"0.0001", "0.0003"} for row in result["validation"].values())
    assert result["best_lr"]["seen"] in ("0.0001", "0.0003")
    validation = [json.loads(line)["id"] for line in (tmp_path / "sweep" / "validation.jsonl").read_text().splitlines()]
    heldout = study.builtin_task.make_eval_problems(50, (2, 3), 0, "search")
    assert not set(validation) & {p.id for p in heldout}
    assert "| seen |" in (tmp_path / "sweep" / "sweep.md").read_text()

    # The study's first seed at a swept learning rate is the sweep's run: it is linked, not retrained.
    chosen = [f"stages.{stage}.lr=0.0001" for stage in ("rl_easy", "rl_hard")]
    study.run_study(tmp_path, replace(settings, arms=("sequential",)), QUICK + chosen)
    reused = tmp_path / "sequential" / "seed0"
    assert reused.is_symlink() and reused.resolve() == (tmp_path / "sweep" / "sequential" / "lr0.0001").resolve()
    assert (reused / "eval" / "heldout.json").is_file() and (reused / "eval" / "validation.json").is_file()


def test_validation_problems_exclude_every_training_problem():
    settings = StudySettings(arms=("sequential",), seeds=(0, 1))
    recipes = study.load_arms(
        settings,
        ["stages.sft.data.task_size=300", "stages.rl_easy.data.task_size=300", "stages.rl_hard.data.task_size=300"],
    )
    ev = replace(QUICK_EVAL, task="search", problems_per_level=40)
    problems = study.validation_problems(recipes, settings.seeds, ev)
    assert len(problems) == 80
    recipe = recipes["sequential"]
    sft_ids = {p.id for p in study.builtin_task.make_problems(300, [1, 2, 3], "train", recipe.seed, "search")}
    assert not {p.id for p in problems} & sft_ids
