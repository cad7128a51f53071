import base64
import json
import re

import pytest

from parallel_r1 import report
from parallel_r1.evaluate import EvalConfig, summarize, write_results

BLOCK = "<Parallel><Path>3+4=7</Path><Path>4+3=7</Path></Parallel><Summary>Both give 7.</Summary>Final Answer: 7"
PLAIN = "3+4=7\nFinal Answer: 7"
WRONG = "<Parallel><Path>3+4=8</Path><Path>4+3=8</Path></Parallel><Summary>Both give 8.</Summary>Final Answer: 8"


def _sample(label, stage, i, response, correct):
    blocks = response.count("<Parallel>")
    return {
        "model": f"{label}/{stage}",
        "benchmark": "heldout",
        "problem_id": f"eval/arith-L{1 + i % 2}-{i:04d}",
        "sample_index": 0,
        "question": f"Ann has 3 coins. Ann gets 4 more. How many coins does Ann have now? ({i})",
        "response": response,
        "answer": "7",
        "pred": "7" if correct else "8",
        "reward": 1.0 if correct else -1.0,
        "correct": correct,
        "well_formed": True,
        "num_blocks": blocks,
        "response_tokens": len(response),
        "path_tokens": [5, 5] * blocks,
        "finish_reason": "stop",
    }


def _write_stage(recipe_dir, index, name, kind, steps, parallel, eval_acc, style):
    stage = recipe_dir / f"{index:02d}-{name}"
    stage.mkdir(parents=True)
    with (stage / "metrics.jsonl").open("w") as f:
        for step in range(1, steps + 1):
            if kind == "sft":
                f.write(json.dumps({"step": step, "loss": 2.0 / step, "grad_norm": 1.0}) + "\n")
            else:
                f.write(
                    json.dumps({"step": step, "reward": 0.1 * step, "accuracy": 0.5, "parallel_ratio": parallel}) + "\n"
                )
    if kind == "grpo":
        with (stage / "rollouts.jsonl").open("w") as f:
            for step in range(1, steps + 1):
                for j in range(4):
                    text = BLOCK if (style == "parallel" and j < 2) else PLAIN
                    f.write(json.dumps({"step": step, "response": text, "correct": True, "reward": 1.0}) + "\n")
    n = 20
    correct = round(eval_acc * n)
    response = BLOCK if style == "parallel" else PLAIN
    samples = [
        _sample(
            recipe_dir.name,
            name,
            i,
            response if i < correct else (WRONG if style == "parallel" else "Final Answer: 8"),
            i < correct,
        )
        for i in range(n)
    ]
    result = summarize(samples, 1, f"{recipe_dir.name}/{name}", "heldout", seconds=1.0)
    write_results(recipe_dir / "eval" / f"{stage.name}.json", [result], samples, EvalConfig(k=1))


def make_run(tmp_path, parallel_accs=(0.4, 0.6, 0.75), sequential_accs=(0.4, 0.5, 0.55)):
    run = tmp_path / "run"
    for label, accs in (("parallel", parallel_accs), ("sequential", sequential_accs)):
        recipe_dir = run / label
        recipe_dir.mkdir(parents=True)
        (recipe_dir / "recipe.yaml").write_text("name: x\n")
        stages = (("sft", "sft", 5), ("rl_easy", "grpo", 4), ("rl_hard", "grpo", 6))
        for i, ((name, kind, steps), acc) in enumerate(zip(stages, accs)):
            _write_stage(recipe_dir, i, name, kind, steps, 0.5 if label == "parallel" else 0.0, acc, label)
    timings = {"data": 1.0, "parallel/sft": 30.0, "total": 100.0}
    (run / "run.json").write_text(
        json.dumps({"recipes": [{"label": "parallel"}, {"label": "sequential"}], "timings": timings})
    )
    return run


def test_evidence_states_sft_vs_rl_and_the_parallel_ratio_of_every_stage(tmp_path):
    run = make_run(tmp_path)
    evidence = report.build_evidence(report.load_run(run))
    par, seq = evidence.recipes
    assert [r.label for r in evidence.recipes] == ["parallel", "sequential"]
    assert par.heldout_accuracy == {"sft": 0.4, "rl_easy": 0.6, "rl_hard": 0.75}
    assert par.sft_accuracy == 0.4 and par.rl_accuracy == 0.75
    assert par.rl_gain == pytest.approx(0.35)
    assert set(par.heldout_parallel_ratio) == {"sft", "rl_easy", "rl_hard"}
    assert par.heldout_parallel_ratio["rl_hard"] == 1.0 and seq.heldout_parallel_ratio["rl_hard"] == 0.0
    assert par.train_parallel_ratio == {"rl_easy": 0.5, "rl_hard": 0.5}
    assert evidence.rl_beats_sft == {"parallel": True, "sequential": True}


def test_rl_that_does_not_help_is_reported_as_such(tmp_path):
    run = make_run(tmp_path, parallel_accs=(0.6, 0.5, 0.5))
    evidence = report.build_evidence(report.load_run(run))
    assert evidence.rl_beats_sft["parallel"] is False
    page, _ = report.render_report(run)
    assert "did not improve" in page


def test_report_page_is_self_contained_with_plots_table_and_rollouts(tmp_path):
    run = make_run(tmp_path)
    out = report.write_report(run)
    page = out.read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # training curves, held-out bars, block positions of the parallel recipe (the baseline has no blocks)
    assert len(images) == 3
    assert all(base64.b64decode(img).startswith(b"\x89PNG") for img in images)
    assert not re.search(r'(src|href)="(http|//)', page)
    assert '<tr data-recipe="sequential">' in page and '<tr data-recipe="parallel">' in page
    # rollouts with their paths side by side
    assert 'class="paths"' in page and "3+4=7" in page
    assert report.read_evidence(out) == json.loads((run / "summary.json").read_text())
    assert report.read_evidence(out)["timings"]["total"] == 100.0
    assert (run / "figures" / "training.png").is_file() and (run / "figures" / "strategy-parallel.png").is_file()


def test_model_output_cannot_inject_markup(tmp_path):
    run = make_run(tmp_path)
    samples = run / "parallel" / "eval" / "02-rl_hard.samples.jsonl"
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    records[0]["response"] = "<script>alert(1)</script>" + records[0]["response"]
    samples.write_text("".join(json.dumps(r) + "\n" for r in records))
    page, _ = report.render_report(run)
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_pick_rollouts_prefers_correct_parallel_then_a_wrong_one():
    samples = [
        _sample("p", "s", i, r, c)
        for i, (r, c) in enumerate([(PLAIN, True), (WRONG, False), (BLOCK, True), (BLOCK, True)])
    ]
    chosen = report.pick_rollouts(samples, limit=4)
    assert [samples.index(s) for s in chosen] == [2, 3, 1, 0]
    assert [samples.index(s) for s in report.pick_rollouts(samples, limit=2)] == [2, 1]


def test_smooth_is_a_trailing_mean():
    assert report.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_bad_run_folders_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        report.load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no recipe folder"):
        report.load_run(tmp_path / "empty")
    (tmp_path / "norecipe" / "r").mkdir(parents=True)
    (tmp_path / "norecipe" / "r" / "recipe.yaml").write_text("name: r\n")
    with pytest.raises(ValueError, match="no stage folders"):
        report.load_run(tmp_path / "norecipe")
    run = make_run(tmp_path)
    (run / "parallel" / "eval" / "00-sft.json").write_text("{}")
    with pytest.raises(ValueError, match="00-sft.json: not an evaluation result"):
        report.load_run(run)


def test_the_first_recipe_is_set_against_every_other_with_clustered_errors(tmp_path):
    run = make_run(tmp_path)
    runs = report.load_run(run)
    evidence = report.build_evidence(runs)
    par = evidence.recipes[0]
    # 15 of 20 right against 11 of 20: the same first problems right, so the paired difference is 4/20.
    plain = par.vs_others["sequential"]
    assert plain["diff"] == pytest.approx(0.2) and plain["problems"] == 20
    assert par.vs_baseline == plain
    # Problems that share a solving computation move together: two clusters of ten widen the error.
    clusters = {f"eval/arith-L{1 + i % 2}-{i:04d}": str(i < 10) for i in range(20)}
    clustered = report.build_evidence(runs, cluster_of=clusters).recipes[0].vs_others["sequential"]
    assert clustered["diff"] == pytest.approx(0.2) and clustered["se"] > plain["se"]
