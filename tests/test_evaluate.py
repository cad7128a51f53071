import json
from collections import Counter
from itertools import combinations

import pytest
import torch

from parallel_r1.answers import extract_answer, is_correct
from parallel_r1.evaluate import (
    BenchmarkResult,
    EvalConfig,
    evaluate_benchmark,
    majority_vote,
    markdown_table,
    pass_at_k,
    pass_k_values,
    resolve_benchmark,
    run_eval,
    samples_path,
    summarize,
)
from parallel_r1.format import parse


def brute_force_pass(correct: list[bool], k: int) -> float:
    subsets = list(combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_enumeration_of_all_subsets():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass([True] * c + [False] * (n - c), k))


def test_pass_at_k_by_hand_and_bad_arguments():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(16, 1, 1) == pytest.approx(1 / 16)
    assert pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 15, 2) == 1.0
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_pass_k_values():
    assert pass_k_values(16) == [1, 2, 4, 8, 16]
    assert pass_k_values(10) == [1, 2, 4, 8, 10]
    assert pass_k_values(1) == [1]


def test_majority_vote_groups_equivalent_answers():
    assert majority_vote(["7", "7.0", "8", None, "8", "8"]) == "8"
    assert majority_vote(["7", "7.0", "8", None, "7.00"]) == "7"  # 7, 7.0 and 7.00 are one answer
    assert majority_vote(["3", "4"]) == "3"  # a tie goes to the first
    assert majority_vote(["\\frac{1}{2}", "0.5", "3", "3"]) == "\\frac{1}{2}"
    assert majority_vote([None, None]) is None
    assert majority_vote(["a", "A", "b"], same=lambda x, y: x.lower() == y.lower()) == "a"


def _record(pid, correct, pred, blocks=0, tokens=10, paths=(), answer="7"):
    return {
        "problem_id": pid,
        "gold": answer,
        "pred": pred,
        "correct": correct,
        "well_formed": True,
        "num_blocks": blocks,
        "response_tokens": tokens,
        "path_tokens": list(paths),
        "finish_reason": "stop",
    }


def test_summarize_by_hand():
    records = [
        _record("a", True, "7", blocks=1, tokens=20, paths=(4, 6)),
        _record("a", False, "8", tokens=10),
        _record("a", False, "8", tokens=10),
        _record("a", True, "7.0", blocks=2, tokens=40, paths=(5, 5, 10, 10)),
        _record("b", False, None, answer="3", tokens=10),
        _record("b", False, "4", answer="3", tokens=10),
        _record("b", True, "3", answer="3", tokens=10),
        _record("b", True, "3", answer="3", tokens=10),
    ]
    result = summarize(records, k=4, model_name="m", benchmark="bench", seconds=2.0)
    assert result.num_problems == 2
    assert result.mean_at_k == pytest.approx(4 / 8)
    assert result.pass_at["1"] == pytest.approx(0.5)
    assert result.pass_at["2"] == pytest.approx((1 - 1 / 6 + 1 - 1 / 6) / 2)
    assert result.pass_at["4"] == 1.0
    # Problem a: {7, 7.0} vs {8, 8} is a tie, won by 7 (seen first); problem b: 3 wins.
    assert result.maj_at_k == 1.0
    assert result.parallel_ratio == pytest.approx(2 / 8)
    assert result.blocks_per_response == pytest.approx(3 / 8)
    assert result.mean_response_tokens == pytest.approx(120 / 8)
    assert result.mean_path_tokens == pytest.approx(40 / 6)
    assert result.tokens_per_second == pytest.approx(60.0)
    with pytest.raises(ValueError, match="problem b of bench has 3 samples"):
        summarize(records[:-1], k=4, model_name="m", benchmark="bench", seconds=1.0)


def test_resolve_benchmark(tmp_path):
    (tmp_path / "gsm8k_test.jsonl").write_text('{"question": "q", "answer": "1"}\n')
    (tmp_path / "math_test.jsonl").write_text('{"question": "q", "answer": "1"}\n')
    assert resolve_benchmark("gsm8k", tmp_path) == ("gsm8k", str(tmp_path / "gsm8k_test.jsonl"))
    assert resolve_benchmark("math500", tmp_path) == ("math500", str(tmp_path / "math_test.jsonl"))
    (tmp_path / "math500.jsonl").write_text('{"question": "q", "answer": "1"}\n')
    assert resolve_benchmark("math500", tmp_path) == ("math500", str(tmp_path / "math500.jsonl"))
    assert resolve_benchmark("mine=" + str(tmp_path / "math500.jsonl"), None)[0] == "mine"
    assert resolve_benchmark("aime24", None) == ("aime24", "aime24")
    with pytest.raises(FileNotFoundError, match="aime24.jsonl"):
        resolve_benchmark("aime24", tmp_path)


def test_markdown_table_has_a_row_per_model_and_benchmark():
    def result(model, bench):
        return BenchmarkResult(
            model, bench, 3, 4, 0.25, {"1": 0.25, "2": 0.4, "4": 0.5}, 0.3, 0.5, 1.0, 0.7, 100, 20, 50.0, 1.0
        )

    table = markdown_table([result("m1", "aime24"), result("m1", "gsm8k"), result("m|2", "aime24")])
    lines = table.splitlines()
    assert len(lines) == 5
    assert "pass@1 | pass@2 | pass@4" in lines[0]
    assert lines[2].startswith("| m1 | aime24 | 3 | 0.250 | 0.250 | 0.400 | 0.500 | 0.300 |")
    assert lines[4].startswith("| m\\|2 | aime24 |")


# ------------------------------------------------------------------------------------------------
# With the real engine: a tiny model trained for a few seconds to answer either 7 (plain) or 9 (with a
# block) to one question, at random. Problems repeat that question with gold 7 or 9, so per-problem
# accuracy varies and every metric is checked against a recomputation from the returned samples.
# ------------------------------------------------------------------------------------------------

TEMPLATE = "Q: {question}\nA: "
QUESTION = "What is 3 + 4?"
SEVEN = "Final Answer: 7"
NINE = "<Parallel><Path>9</Path><Path>9</Path></Parallel><Summary>9</Summary>Final Answer: 9"


@pytest.fixture(scope="module")
def seven_or_nine(tiny_tokenizer):
    from parallel_r1.tiny import build_model

    tok = tiny_tokenizer
    model = build_model(tok, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, seed=0)
    prompt = tok(TEMPLATE.replace("{question}", QUESTION))["input_ids"]
    rows = [prompt + tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in (SEVEN, NINE)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    labels = ids.clone()
    labels[:, : len(prompt)] = -100
    for i, r in enumerate(rows):
        labels[i, len(r) :] = -100
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _problems(golds):
    from parallel_r1.data import Problem

    return [Problem(QUESTION, gold, "toy", f"toy/{i}") for i, gold in enumerate(golds)]


def test_evaluate_benchmark_metrics_match_recomputation(seven_or_nine, tiny_tokenizer):
    from parallel_r1.engine import ParallelEngine

    k = 8
    cfg = EvalConfig(k=k, max_response_tokens=64, max_path_tokens=24, variant="seen", template=TEMPLATE, seed=3)
    engine = ParallelEngine(seven_or_nine, tiny_tokenizer, max_batch_size=64)
    problems = _problems(["7", "9", "7", "9"])
    result, records = evaluate_benchmark(engine, problems, cfg, "toy-model", "toy")

    assert len(records) == len(problems) * k
    assert engine.stats.forwards > 0 and 0 < result.engine_utilisation == engine.stats.utilisation <= 1
    by_problem = {}
    for r in records:
        by_problem.setdefault(r["problem_id"], []).append(r)
        assert r["correct"] == is_correct(r["response"], r["gold"])
        assert r["num_blocks"] == parse(r["response"]).num_blocks
        assert r["pred"] == extract_answer(r["response"])
    correct = [[r["correct"] for r in g] for g in by_problem.values()]
    assert 0 < sum(map(sum, correct)) < len(records), "the toy model should be right only some of the time"

    assert result.mean_at_k == pytest.approx(sum(map(sum, correct)) / len(records))
    for kk in (1, 2, 4, 8):
        expected = sum(brute_force_pass(c, kk) for c in correct) / len(correct)
        assert result.pass_at[str(kk)] == pytest.approx(expected)
    maj = 0
    for group in by_problem.values():
        top = Counter(r["pred"] for r in group if r["pred"] is not None).most_common(1)
        maj += bool(top) and top[0][0] == group[0]["gold"]
    assert result.maj_at_k == pytest.approx(maj / len(by_problem))
    assert result.parallel_ratio == pytest.approx(sum(r["num_blocks"] > 0 for r in records) / len(records))
    assert 0 < result.parallel_ratio < 1

    # The token counts come from the engine's own ids: the same seed reproduces the same rollouts.
    rollouts = engine.generate([TEMPLATE.replace("{question}", QUESTION)] * 4, n=k, params=_params(cfg))
    assert [r.text for r in rollouts] == [r["response"] for r in records]
    assert result.mean_response_tokens == pytest.approx(sum(len(r.response_ids) for r in rollouts) / len(rollouts))
    paths = [p.token_span.end - p.token_span.start for r in rollouts for b in r.structure.blocks for p in b.paths]
    assert paths and result.mean_path_tokens == pytest.approx(sum(paths) / len(paths))
    assert result.tokens_per_second > 0


def _params(cfg):
    from parallel_r1.rollout import sampling_params

    return sampling_params(cfg, variant=cfg.variant, seed=cfg.seed)


def test_run_eval_writes_results_and_samples_for_two_models(tmp_path, seven_or_nine, tiny_tokenizer):
    from parallel_r1.cli import main
    from parallel_r1.models import save_model

    save_model(seven_or_nine, tiny_tokenizer, tmp_path / "model_a")
    save_model(seven_or_nine, tiny_tokenizer, tmp_path / "model_b")
    data = tmp_path / "data"
    data.mkdir()
    (data / "gsm8k_test.jsonl").write_text(
        "".join(json.dumps({"question": QUESTION, "answer": g}) + "\n" for g in "79")
    )
    (data / "aime24.jsonl").write_text(json.dumps({"question": QUESTION, "answer": "9"}) + "\n")
    (tmp_path / "template.txt").write_text(TEMPLATE)
    out = tmp_path / "results.json"
    argv = [
        "eval",
        "--model",
        str(tmp_path / "model_a"),
        str(tmp_path / "model_b"),
        "--benchmarks",
        "gsm8k,aime24",
        "--data-dir",
        str(data),
        "--k",
        "4",
        "--max-response-tokens",
        "64",
        "--max-path-tokens",
        "24",
        "--variant",
        "seen",
        "--template",
        str(tmp_path / "template.txt"),
        "--out",
        str(out),
    ]
    assert main(argv) == 0

    payload = json.loads(out.read_text())
    rows = [(r["model"].rsplit("/", 1)[-1], r["benchmark"], r["num_problems"]) for r in payload["results"]]
    assert rows == [
        ("model_a", "gsm8k", 2),
        ("model_a", "aime24", 1),
        ("model_b", "gsm8k", 2),
        ("model_b", "aime24", 1),
    ]
    samples = [json.loads(line) for line in samples_path(out).read_text().splitlines()]
    assert len(samples) == 2 * (2 + 1) * 4
    for result in payload["results"]:
        mine = [s for s in samples if s["model"] == result["model"] and s["benchmark"] == result["benchmark"]]
        assert result["mean_at_k"] == pytest.approx(sum(s["correct"] for s in mine) / len(mine))
    # Same weights, same seed: both models give the same numbers.
    assert payload["results"][0]["mean_at_k"] == payload["results"][2]["mean_at_k"]


def test_run_eval_on_real_benchmark_files(shared_data, tmp_path, tiny_model, tiny_tokenizer):
    from parallel_r1.models import save_model

    save_model(tiny_model, tiny_tokenizer, tmp_path / "tiny")
    cfg = EvalConfig(k=2, max_response_tokens=24, max_path_tokens=8)
    results = run_eval(
        [str(tmp_path / "tiny")],
        ["aime25", "math500", "gsm8k"],
        cfg,
        data_dir=shared_data,
        limit=2,
        out=tmp_path / "r.json",
    )
    assert [(r.benchmark, r.num_problems, r.k) for r in results] == [
        ("aime25", 2, 2),
        ("math500", 2, 2),
        ("gsm8k", 2, 2),
    ]
    samples = [json.loads(line) for line in (tmp_path / "r.samples.jsonl").read_text().splitlines()]
    gold = {json.loads(line)["answer"] for line in (shared_data / "aime25.jsonl").read_text().splitlines()[:2]}
    assert {s["gold"] for s in samples if s["benchmark"] == "aime25"} == gold
    assert all(s["response_tokens"] <= 24 for s in samples)


# ---- prompts: the chat template and few-shot examples ----


class ScriptedEngine:
    """An engine that answers every prompt with `reply` and remembers the prompts it was given."""

    def __init__(self, tokenizer, reply: str):
        self.tokenizer, self.reply, self.prompts = tokenizer, reply, []

    def generate(self, prompts, n=1, params=None):
        from parallel_r1.rollout import make_rollout

        self.prompts += prompts
        ids = self.tokenizer(self.reply, add_special_tokens=False)["input_ids"]
        return [
            make_rollout(
                self.tokenizer,
                i,
                j,
                self.tokenizer(p)["input_ids"],
                ids,
                [True] * len(ids),
                [0.0] * len(ids),
                "stop",
                False,
            )
            for i, p in enumerate(prompts)
            for j in range(n)
        ]


def test_evaluate_benchmark_prompts_through_the_chat_template(chat_tokenizer):
    from parallel_r1.prompts import build_prompt

    engine = ScriptedEngine(chat_tokenizer, "3 + 4 = 7\nFinal Answer: 7")
    cfg = EvalConfig(k=1, template=TEMPLATE, system_prompt="Be brief.")
    result, _ = evaluate_benchmark(engine, _problems(["7"]), cfg, "m", "toy")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": build_prompt(QUESTION, TEMPLATE).strip()},
    ]
    assert engine.prompts == [chat_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)]
    assert result.mean_at_k == 1.0
    off = ScriptedEngine(chat_tokenizer, "Final Answer: 7")
    evaluate_benchmark(off, _problems(["7"]), EvalConfig(k=1, template=TEMPLATE, chat_template="off"), "m", "toy")
    assert off.prompts == [build_prompt(QUESTION, TEMPLATE)]
    with pytest.raises(ValueError, match="no chat template"):
        evaluate_benchmark(
            ScriptedEngine(_plain(chat_tokenizer), ""), _problems(["7"]), EvalConfig(k=1, chat_template="on"), "m", "t"
        )


def _plain(tokenizer):
    from copy import deepcopy

    plain = deepcopy(tokenizer)
    plain.chat_template = None
    return plain


def test_a_plain_few_shot_answer_is_read_before_the_next_problem_the_model_makes_up(tiny_tokenizer):
    from parallel_r1.prompts import MINERVA_TEMPLATE, Shot

    reply = "3 + 4 = 7.\nFinal Answer: 7\n\nProblem:\nWhat is 9 + 9?\n\nSolution:\nFinal Answer: 18"
    cfg = EvalConfig(k=1, template=MINERVA_TEMPLATE)
    shots = (Shot("What is 1 + 1?", "Final Answer: 2"),)
    with_shots, records = evaluate_benchmark(
        ScriptedEngine(tiny_tokenizer, reply), _problems(["7"]), cfg, "m", "t", shots
    )
    assert with_shots.mean_at_k == 1.0 and records[0]["pred"] == "7"
    without, records = evaluate_benchmark(ScriptedEngine(tiny_tokenizer, reply), _problems(["7"]), cfg, "m", "t")
    assert without.mean_at_k == 0.0 and records[0]["pred"] == "18"


def _gsm8k_rows(start, n):
    return [
        {
            "question": f"Ann has {i} pens and buys 2. How many pens?",
            "answer": f"{i} + 2 = <<{i}+2={i + 2}>>{i + 2}\n#### {i + 2}",
        }
        for i in range(start, start + n)
    ]


def test_shots_come_from_the_training_split_and_never_from_the_evaluated_problems(
    tmp_path, monkeypatch, tiny_model, tiny_tokenizer
):
    from parallel_r1.engine import ParallelEngine
    from parallel_r1.models import save_model

    data = tmp_path / "data"
    data.mkdir()
    test_rows, train_rows = _gsm8k_rows(0, 3), _gsm8k_rows(0, 2) + _gsm8k_rows(10, 3)  # 2 train rows are also test rows
    for name, rows in (("gsm8k_test", test_rows), ("gsm8k_train", train_rows)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_model(tiny_model, tiny_tokenizer, tmp_path / "tiny")
    seen = []
    generate = ParallelEngine.generate
    monkeypatch.setattr(
        ParallelEngine, "generate", lambda self, prompts, **kw: seen.extend(prompts) or generate(self, prompts, **kw)
    )
    cfg = EvalConfig(k=1, max_response_tokens=4, shots=3, template="Problem:\n{question}\n\nSolution:\n")
    run_eval([str(tmp_path / "tiny")], ["gsm8k"], cfg, data_dir=data)
    assert len(seen) == 3
    for prompt, row in zip(seen, test_rows, strict=True):
        shown = [block.split("\n\nSolution:")[0] for block in prompt.split("Problem:\n")[1:]]
        assert shown[-1] == row["question"]  # the evaluated problem comes last
        # The shots: from the training split, without the two problems it shares with the evaluated one.
        assert sorted(shown[:-1]) == sorted(r["question"] for r in train_rows[2:])
        assert "Solution:\n10 + 2 = 12\nFinal Answer: 12\n\n" in prompt  # worked, no calculator annotations
    with pytest.raises(ValueError, match="shots would be drawn from the evaluated problems"):
        run_eval(
            [str(tmp_path / "tiny")],
            ["gsm8k"],
            EvalConfig(k=1, shots=1, shots_from=str(data / "gsm8k_test.jsonl")),
            data_dir=data,
        )
    with pytest.raises(ValueError, match="no training split known"):
        run_eval([str(tmp_path / "tiny")], ["t=" + str(data / "gsm8k_test.jsonl")], EvalConfig(k=1, shots=1))


def test_shared_gsm8k_train_split_has_no_worked_solutions_to_draw_from(shared_data):
    from parallel_r1.evaluate import shot_pool

    with pytest.raises(ValueError, match="no worked solutions"):
        shot_pool("gsm8k", str(shared_data / "gsm8k_test.jsonl"), EvalConfig(shots=4), shared_data)


def test_hub_gsm8k_is_evaluated_on_its_test_split_and_its_shots_come_from_train():
    from parallel_r1.evaluate import eval_split, shot_source

    assert eval_split("gsm8k") == "test" and eval_split("math500") is None
    assert shot_source("gsm8k", "gsm8k", EvalConfig(shots=2), None) == "gsm8k"  # load_problems' default: train
    with pytest.raises(ValueError, match="shots would be drawn from the evaluated problems"):
        shot_source("math500", "math500", EvalConfig(shots=2, shots_from="math500"), None)
