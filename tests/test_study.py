"""`parallel-r1 study`: arms at equal budget, SFT per seed, jobs and their order, summary, resumption, sweep."""

import json
from dataclasses import replace

import pytest

from parallel_r1 import study, tasks
from parallel_r1.config import ConfigError
from parallel_r1.settings import STUDY_RECIPES, EvalSettings

# A study small enough for a test: a few SFT and RL steps, two problems per level, two samples each.
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
QUICK_EVAL = EvalSettings(problems_per_level=2, levels=(2, 3), k=2, batch_size=16)


def test_arms_have_equal_rl_budgets_and_share_sft_where_it_is_the_same():
    recipes = study.load_arms(study.StudySettings(), [])
    assert list(recipes) == list(study.ARMS)
    keys = {arm: study.sft_key(r) for arm, r in recipes.items()}
    assert keys["unseen"] == keys["unseen_kl"]
    assert len({keys[a] for a in study.SCHEDULE_FAMILIES[0]}) == 1
    assert len(set(keys.values())) == 6  # sequential, thorough, plain, seen, unseen, mixed
    assert len({str(study.rl_budget(r)) for r in recipes.values()}) == 1
    assert not any(study.is_parallel(recipes[a]) for a in study.CONTROLS)
    assert all(study.is_parallel(recipes[a]) for a in study.ARMS if a not in study.CONTROLS)
    # The controls hold the parallel script: plain and thorough differ from seen's SFT in the style only.
    styles = {a: r.stages[0].data.task_style for a, r in recipes.items()}
    assert styles["plain"] == "plain" and styles["thorough"] == "thorough" and styles["seen"] == "parallel"
    assert all(styles[a] == "mixed" for a in study.SCHEDULE_FAMILIES[0])
    # The optional choice family: one SFT (the choice style), the default arms' RL budget.
    choice = study.load_arms(study.StudySettings(arms=study.SCHEDULE_FAMILIES[1]), [])
    assert len({study.sft_key(r) for r in choice.values()}) == 1
    assert {r.stages[0].data.task_style for r in choice.values()} == {"choice"}
    assert {str(study.rl_budget(r)) for r in choice.values()} == {str(study.rl_budget(recipes["seen"]))}
    assert study.PRIMARY in recipes and recipes["unseen_kl"].stages[1].grpo.kl_coef > 0


def test_a_different_rl_budget_is_refused(tmp_path):
    for name in ("base", "sequential"):
        (tmp_path / f"{name}.yaml").write_text((STUDY_RECIPES / f"{name}.yaml").read_text())
    (tmp_path / "seen.yaml").write_text("extends: base.yaml\nstages:\n  - name: rl_hard\n    max_steps: 21\n")
    settings = study.StudySettings(arms=("sequential", "seen"), recipes_dir=tmp_path)
    with pytest.raises(ConfigError, match="different RL budgets"):
        study.load_arms(settings, [])


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="distinct"):
        study.StudySettings(seeds=(0, 0))
    with pytest.raises(ConfigError, match="workers and threads"):
        study.StudySettings(workers=0)


def test_every_seed_trains_its_own_sft_and_rl_jobs_wait_for_it(tmp_path):
    settings = study.StudySettings(arms=("sequential", "unseen", "unseen_kl"), seeds=(0, 1))
    recipes = study.load_arms(settings, [])
    jobs = study.study_jobs(recipes, settings.seeds, tmp_path, [], QUICK_EVAL)
    names = [j.name for j in jobs]
    sft = [n for n in names if n.startswith("sft/")]
    assert len(sft) == 4  # two distinct SFTs x two seeds: unseen and unseen_kl share theirs
    by_name = {j.name: j for j in jobs}
    for arm in settings.arms:
        for seed in settings.seeds:
            job = by_name[f"{arm}/seed{seed}"]
            assert job.after in sft and job.after.endswith(f"seed{seed}") and job.seed == seed
            assert job.init_from == study.sft_dir(tmp_path, recipes[arm], seed)
    assert by_name["unseen/seed1"].after == by_name["unseen_kl/seed1"].after
    assert study.sft_recipe(recipes["unseen"], 1).seed == 1


def test_jobs_run_after_the_job_they_wait_for():
    a = study.Job("a", None, 0, None, [], QUICK_EVAL, None)
    b = study.Job("b", None, 0, None, [], QUICK_EVAL, None, after="a")
    c = study.Job("c", None, 0, None, [], QUICK_EVAL, None, after="b")
    assert [j.name for j in study._order([c, b, a])] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="not there"):
        study.run_jobs([b], workers=1)


def test_validation_problems_come_from_the_validation_split():
    ev = replace(QUICK_EVAL, task="search", problems_per_level=30)
    problems = study.validation_problems(ev)
    assert len(problems) == 60
    keys = [tasks.cluster_key(p, "search") for p in problems]
    assert all(tasks.search.split_of(k) == "valid" for k in keys)
    heldout = {p.id for p in tasks.make_eval_problems(200, (2, 3), 0, "search")}
    assert not {p.id for p in problems} & heldout


@pytest.mark.slow
def test_study_runs_side_by_side_resumes_and_reports(tmp_path):
    settings = study.StudySettings(arms=("sequential", "plain", "seen"), seeds=(0, 1), eval=QUICK_EVAL, workers=2)
    report = study.run_study(tmp_path, settings, QUICK)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert report.is_file() and "parallel-r1 study" in report.read_text()
    assert len(list((tmp_path / "sft").iterdir())) == 3
    assert all(len(list(d.iterdir())) == 2 for d in (tmp_path / "sft").iterdir())  # one SFT per seed
    for arm in settings.arms:
        row = summary["arms"][arm]
        assert row["seeds"] == ["0", "1"] and row["rl"]["seeds"] == 2 and row["sft"]["seeds"] == 2
        assert [r["m"] for r in row["rl_majority"]] == [1, 2]
        assert "rl_gain" in row and set(row["rl_caps"]) == {str(c) for c in study_caps()}
        assert all(len(t) == 4 for t in row["trajectory"].values())  # 2 + 2 GRPO steps per seed
    comp = summary["comparisons"]
    assert set(comp["primary"]) == {"sequential", "plain"}
    assert set(comp["vs_baseline"]) == {"plain", "seen"}
    assert comp["primary"]["plain"]["df"] == 2
    table = (tmp_path / "study.md").read_text()
    assert all(f"| {arm} |" in table for arm in settings.arms)
    assert (tmp_path / "logs").is_dir() and any((tmp_path / "logs").iterdir())

    # Resuming retrains nothing and re-evaluates nothing.
    stamps = {p: p.stat().st_mtime for p in tmp_path.rglob("DONE")} | {
        p: p.stat().st_mtime for p in tmp_path.rglob("eval/*.json")
    }
    study.run_study(tmp_path, replace(settings, workers=1), QUICK)
    assert {p: p.stat().st_mtime for p in stamps} == stamps


def study_caps():
    from parallel_r1.study_summary import CAPS

    return CAPS


@pytest.mark.slow
def test_sweep_scores_learning_rates_on_validation_problems_and_the_study_reuses_its_run(tmp_path):
    settings = study.StudySettings(arms=("sequential", "seen"), seeds=(0,), eval=QUICK_EVAL, workers=1)
    result = study.run_sweep(tmp_path, settings, QUICK, lrs=(1e-4, 3e-4))
    assert set(result["validation"]) == {"sequential", "seen"}
    assert all(set(row) == {"no RL", "0.0001", "0.0003"} for row in result["validation"].values())
    assert result["best_lr"]["seen"] in ("0.0001", "0.0003")
    assert "| seen |" in (tmp_path / "sweep" / "sweep.md").read_text()

    chosen = [f"stages.{stage}.lr=0.0001" for stage in ("rl_easy", "rl_hard")]
    study.run_study(tmp_path, replace(settings, arms=("sequential",)), QUICK + chosen)
    reused = tmp_path / "sequential" / "seed0"
    assert reused.is_symlink()
    assert reused.resolve() == (tmp_path / "sweep" / "sequential" / "seed0-lr0.0001").resolve()
    assert (reused / "eval" / "heldout.json").is_file() and (reused / "eval" / "validation.json").is_file()


def test_the_planned_arm_is_unseen_with_planned_blocks_at_the_same_budget():
    recipes = study.load_arms(study.StudySettings(arms=("unseen", "unseen_planned")), [])
    unseen, planned = recipes["unseen"], recipes["unseen_planned"]
    assert study.rl_budget(unseen) == study.rl_budget(planned)
    assert planned.stages[0].data.task_style == "planned" and study.sft_key(planned) != study.sft_key(unseen)
    for a, b in zip(unseen.stages[1:], planned.stages[1:]):
        assert not a.grpo.rollout.plans and b.grpo.rollout.plans and b.grpo.rollout.max_paths == 3
        assert a.variant == b.variant == "unseen"
    assert "unseen_planned" not in study.StudySettings().arms
