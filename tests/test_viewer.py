import json
import re
import shutil
import subprocess

import pytest

from parallel_r1.viewer import render_html, render_response, write_viewer

BLOCK = (
    "Start.<Parallel><Path>3 + 4 = 7</Path><Path>4 + 3 = 7</Path><Path>7</Path></Parallel>"
    "<Summary>All give 7.</Summary>Final Answer: 7"
)
EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)> & "quotes"'

RECORDS = [
    {"step": 0, "prompt": "Q1", "response": BLOCK, "answer": "7", "pred": "7", "reward": 1.2, "correct": True},
    {
        "step": 0,
        "prompt": "Q2",
        "response": "plain " + EVIL + " Final Answer: 8",
        "answer": "7",
        "pred": "8",
        "reward": -1.0,
        "correct": False,
    },
    {
        "step": 1,
        "prompt": EVIL,
        "response": BLOCK.replace("Start.", EVIL),
        "answer": EVIL,
        "pred": EVIL,
        "reward": -1.0,
        "correct": False,
        "num_blocks": 1,
    },
    {
        "step": 1,
        "prompt": "Q4",
        "response": "no block, Final Answer: 7",
        "answer": "7",
        "pred": "7",
        "reward": 1.0,
        "correct": True,
    },
]


def _cards(page: str) -> list[str]:
    return re.findall(r'<article class="sample"[^>]*>', page)


def test_paths_render_as_columns_with_tags():
    html = render_response(BLOCK)
    assert html.count('<div class="path">') == 3
    assert "repeat(3,minmax(0,1fr))" in html
    assert html.count('<span class="tag">&lt;Path&gt;</span>') == 3
    assert '<span class="tag">&lt;/Summary&gt;</span>' in html
    assert "All give 7." in html and "Start." in html and "Final Answer: 7" in html


def test_a_planned_block_shows_its_plan_and_is_checked_as_planned():
    planned = "<Parallel>5*3\n7*3\n<Path>5*3=15</Path><Path>7*3=21</Path></Parallel><Summary>7</Summary>"
    html = render_response(planned)
    assert '<div class="plan">plan<ol><li>5*3</li><li>7*3</li></ol></div>' in html
    assert html.count('<div class="path">') == 2 and "format errors" not in html
    off = planned.replace("<Path>7*3=21", "<Path>9*3=27")
    assert "path_off_plan" in render_response(off)
    assert '<div class="plan">' not in render_response(BLOCK)


def test_cut_off_block_is_marked():
    html = render_response("a<Parallel><Path>one</Path><Path>tw")
    assert html.count('<div class="path">') == 2
    assert "(path cut off)" in html and "(block cut off)" in html
    assert "format errors: unclosed_block, unclosed_path" in html


def test_all_text_is_escaped():
    page = render_html(RECORDS)
    body = page.split("<main>", 1)[1].split("</main>", 1)[0]
    assert "<script" not in body and "<img" not in body
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in body
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; &quot;quotes&quot;" in body
    assert page.count("<script>") == 1  # only the page's own


def test_cards_carry_filter_attributes_and_counts():
    page = render_html(RECORDS, total=10)
    cards = _cards(page)
    assert len(cards) == 4
    assert [re.search(r'data-correct="(\d)"', c).group(1) for c in cards] == ["1", "0", "0", "1"]
    assert [re.search(r'data-blocks="(\d)"', c).group(1) for c in cards] == ["1", "0", "1", "0"]
    assert '<option value="step 0">' in page and '<option value="step 1">' in page
    assert "4 of 4 of 10 shown" in re.sub(r"<[^>]+>", "", page)


def test_write_viewer_reads_eval_output(tmp_path):
    samples = [
        {
            "model": "ckpt",
            "benchmark": "gsm8k",
            "problem_id": "p/1",
            "sample_index": 0,
            "response": BLOCK,
            "answer": "7",
            "pred": "7",
            "correct": True,
            "num_blocks": 1,
            "question": "What is 3 + 4?",
        }
    ]
    (tmp_path / "r.samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (tmp_path / "r.json").write_text(json.dumps({"results": [], "samples": "r.samples.jsonl"}))
    page = write_viewer([tmp_path / "r.json"], tmp_path / "out" / "page.html").read_text()
    assert len(_cards(page)) == 1
    assert "What is 3 + 4?" in page and "gsm8k" in page and 'data-group="ckpt"' in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _dump_dom(url: str, profile) -> str:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]
    done = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", url], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH")
def test_filters_in_a_real_browser(tmp_path):
    from parallel_r1.cli import main

    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    page = tmp_path / "page.html"
    assert main(["view", str(tmp_path / "r.jsonl"), "--out", str(page)]) == 0

    def visible(fragment: str) -> list[str]:
        dom = _dump_dom(page.as_uri() + fragment, tmp_path / "profile")
        # The script ran: it sets the count on <body>, and no injected element exists.
        assert re.search(r"<body[^>]*data-shown=", dom)
        assert "<img" not in dom
        return [c for c in _cards(dom) if "hidden" not in c]

    assert len(visible("")) == 4
    assert [re.search(r'data-correct="(\d)"', c).group(1) for c in visible("#correct=no")] == ["0", "0"]
    with_blocks = visible("#blocks=yes")
    assert len(with_blocks) == 2 and all('data-blocks="1"' in c for c in with_blocks)
    assert len(visible("#correct=yes&blocks=no")) == 1
    assert len(visible("#group=step%201")) == 2
    dom = _dump_dom(page.as_uri(), tmp_path / "profile")
    assert dom.count('<div class="path">') == 3 + 3  # two block responses with three path columns each


GRPO_STAGE = """
name: view
logging: {progress: false}
stages:
  - name: rl_easy
    kind: grpo
    variant: unseen
    model: {name_or_path: tiny, tiny: {hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 128}}
    data: {source: task, task_size: 8, prompt: question}
    max_steps: 2
    grpo:
      prompts_per_step: 2
      n: 2
      mini_batch_size: 2
      rollout: {max_response_tokens: 16, max_path_tokens: 6}
"""


def test_view_of_a_real_grpo_stage_shows_prediction_gold_and_question(tmp_path):
    """`parallel-r1 view runs/<run>/NN-<grpo stage>`: the model's answer as pred, the problem's as gold."""
    from html import escape

    from parallel_r1.answers import extract_answer
    from parallel_r1.cli import main
    from parallel_r1.config import parse_recipe
    from parallel_r1.files import read_jsonl
    from parallel_r1.grpo import load_stage_problems
    from parallel_r1.recipe import run_recipe

    recipe = parse_recipe(GRPO_STAGE)
    run_recipe(recipe, tmp_path / "run")
    stage = tmp_path / "run" / "00-rl_easy"
    page = tmp_path / "page.html"
    assert main(["view", str(stage), "--out", str(page)]) == 0

    records = read_jsonl(stage / "rollouts.jsonl")
    cards = page.read_text().split('<article class="sample"')[1:]
    assert len(cards) == len(records) == 2 * 2 * 2  # steps x prompts x n
    problems = {p.id: p for p in load_stage_problems(recipe.stages[0], recipe.seed)}
    for card, record in zip(cards, records):
        problem = problems[record["problem_id"]]
        assert (record["gold"], record["question"]) == (problem.answer, problem.question)
        assert record["pred"] == extract_answer(record["response"])
        assert f"pred <b>{escape(str(record['pred']))}</b>" in card
        assert f"gold <b>{escape(problem.answer)}</b>" in card
        assert escape(problem.question) in card


def test_records_in_older_names_are_shown_the_same(tmp_path):
    """GRPO logs once held the gold in "gold" and the prediction in "answer"; eval samples the other way."""
    old_grpo = {"step": 1, "response": BLOCK, "gold": "7", "answer": "8", "correct": False}
    old_eval = {"model": "m", "response": BLOCK, "answer": "7", "pred": "8", "correct": False}
    for record in (old_grpo, old_eval):
        (tmp_path / "r.jsonl").write_text(json.dumps(record) + "\n")
        page = write_viewer([tmp_path / "r.jsonl"], tmp_path / "page.html").read_text()
        assert "pred <b>8</b>" in page and "gold <b>7</b>" in page


def test_a_nested_block_is_drawn_inside_its_path():
    inner = "<Parallel><Path>5+1</Path><Path>5+2</Path></Parallel><Summary>7 works</Summary>"
    text = f"go<Parallel><Path>try 5{inner} so 5</Path><Path>try 4</Path></Parallel><Summary>5</Summary>done"
    html = render_response(text, max_depth=2)
    assert html.count('<div class="block">') == 2 and "format errors" not in html
    first_path = html.index('<div class="path">')
    assert first_path < html.index("5+1") < html.index("so 5") < html.index("try 4")  # inside path 1, in order
    assert "nested_block" in render_response(text)  # at max_depth 1 it is an error
