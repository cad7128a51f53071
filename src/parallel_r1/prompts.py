"""The prompt a model sees: the instruction templates, the tokenizer's chat template around them, a system
prompt and few-shot examples.

The instruction (`PROMPT_TEMPLATES`, filled with the question) is the whole prompt of a plain-text model.
With the chat template on (`chat_template: on`, or `auto` and a tokenizer that has one) it is the user turn:
an optional system turn, then the user turn, then the template's generation prompt, which opens the
assistant turn the response is written in. The six tags are special tokens of the tokenizer, so they stay
one token each inside that turn, and the response ends with the template's end-of-turn token
(`end_of_turn_id`), which `models.load_model_and_tokenizer` makes the engine stop at.

A rendered prompt is text for `tokenizer(text)`, the way the engine, SFT and GRPO tokenize every prompt:
it gives exactly the ids of ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` (a BOS
that the template writes and the tokenizer adds again is left out of the text).

Few-shot examples (`Shot`: a question and its worked solution) come before the question: each is the
instruction for its question followed by its solution (as user and assistant turns under the chat template,
as lm-evaluation-harness's multi-turn few-shot does). With the ``minerva`` template the plain-text prompt is
the layout of Minerva's MATH prompt (``Problem:`` / ``Solution:`` blocks separated by a blank line), the
answer line being ours (``Final Answer: <answer>``, what `answers.extract_answer` reads).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from parallel_r1.settings import CHAT_TEMPLATE_MODES, ConfigError, InputError

log = logging.getLogger(__name__)

PROMPT_TEMPLATE = """\
Work out the problem below step by step.

You can think in parallel. Where more than one approach looks promising, or where an independent check \
would make you more confident, open a parallel block:
<Parallel><Path>one line of reasoning</Path><Path>another line of reasoning</Path></Parallel>\
<Summary>what the paths establish together</Summary>
A block needs at least two paths. Each path must work on its own: it may not mention, build on or \
compare itself with another path, as if it could not see them. Right after </Parallel>, write exactly \
one <Summary>...</Summary> that combines the paths, then carry on with your reasoning. Blocks do not \
go inside other blocks; use as many as help, and none where a single line of thought is enough.

Finish with a last line of the form
Final Answer: <answer>

Problem: {question}
"""

SEQUENTIAL_TEMPLATE = """\
Work out the problem below step by step.

Finish with a last line of the form
Final Answer: <answer>

Problem: {question}
"""

QUESTION_TEMPLATE = "Problem: {question}\n"

# The question as it is: the user turn of a model card whose system prompt says how to answer.
BARE_TEMPLATE = "{question}"

# Minerva's MATH layout: the solution follows on the next line.
MINERVA_TEMPLATE = "Problem:\n{question}\n\nSolution:\n"

# The templates by the names a recipe's `data.prompt` and `parallel-r1 eval --template` take.
PROMPT_TEMPLATES = {
    "parallel": PROMPT_TEMPLATE,
    "sequential": SEQUENTIAL_TEMPLATE,
    "question": QUESTION_TEMPLATE,
    "bare": BARE_TEMPLATE,
    "minerva": MINERVA_TEMPLATE,
}

# Where a few-shot prompt's response ends: a base model that has answered goes on with a next problem.
SHOT_STOP = "\n\nProblem:"


def prompt_template(name: str) -> str:
    """The template named `name`: "parallel" (asks for blocks), "sequential" (does not), "question" (the
    question alone, a short prompt for tiny models trained from scratch), "bare" (the question as it is,
    for a system prompt that says how to answer) or "minerva" (Minerva's ``Problem:`` / ``Solution:``
    layout, for few-shot prompts of base models)."""
    if name not in PROMPT_TEMPLATES:
        raise InputError(f"unknown prompt template {name!r} (known: {', '.join(PROMPT_TEMPLATES)})")
    return PROMPT_TEMPLATES[name]


def build_prompt(question: str, template: str = PROMPT_TEMPLATE) -> str:
    """The instruction for `question`: `template` with its ``{question}`` placeholder filled in."""
    if "{question}" not in template:
        raise InputError("the prompt template has no {question} placeholder")
    # replace, not str.format: questions and user templates are full of LaTeX braces.
    return template.replace("{question}", question.strip())


# ---------------------------------------------------------------------------------------------------
# The chat template.


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def uses_chat_template(tokenizer, mode: str, where: str = "chat_template") -> bool:
    """Whether prompts go through `tokenizer`'s chat template under `mode` (auto: when it has one)."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise ConfigError(f"{where}: expected one of {', '.join(CHAT_TEMPLATE_MODES)}, got {mode!r}")
    if mode == "on" and not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(
            f"{where} is on, but the tokenizer of {name} has no chat template (use auto or off for this model)"
        )
    return has_chat_template(tokenizer) if mode == "auto" else mode == "on"


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    with_specials = tokenizer("a")["input_ids"][:1]
    return bos is not None and with_specials == [bos] != tokenizer("a", add_special_tokens=False)["input_ids"][:1]


def chat_text(tokenizer, messages: list[dict]) -> str:
    """`messages` and the generation prompt through the chat template, as text that `tokenizer(text)` turns
    into the template's ids."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos) :]
    return text


_MARK = "PARALLELR1ENDOFTURNMARK"


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with (``<|im_end|>``, ``<|eot_id|>``);
    None without a template, or when the text after the turn does not start with a special token."""
    if not has_chat_template(tokenizer):
        return None
    messages = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": _MARK}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if _MARK not in text:
        return None
    ids = tokenizer(text.split(_MARK, 1)[1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return ids[0] if ids and ids[0] in special else None


# ---------------------------------------------------------------------------------------------------
# Few-shot examples.


@dataclass(frozen=True)
class Shot:
    question: str
    solution: str  # the worked solution, ending in its "Final Answer: ..." line


def shot_solution(solution: str, answer: str) -> str:
    """A worked solution that ends in the answer line the prompts ask for (added when it has none)."""
    solution = solution.strip()
    if "final answer:" in solution.lower().rsplit("\n", 1)[-1]:
        return solution
    return f"{solution}\nFinal Answer: {answer}"


def draw_shots(pool: Sequence, k: int, seed: int, exclude: Sequence[str] = ()) -> tuple[Shot, ...]:
    """`k` worked examples drawn (seeded) from `pool` (`data.Problem`s with a solution), none of whose
    questions is in `exclude` (the evaluated problems: a shot must never give an answer away)."""
    banned = {q.strip() for q in exclude}
    candidates = [p for p in pool if p.solution and p.question.strip() not in banned]
    if len(candidates) < k:
        raise InputError(
            f"{k} shots asked, but only {len(candidates)} problems with a worked solution are there to draw from"
        )
    drawn = random.Random(f"shots-{seed}").sample(candidates, k)
    return tuple(Shot(p.question, shot_solution(p.solution, p.answer)) for p in drawn)


# ---------------------------------------------------------------------------------------------------
# The prompt.


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes the prompt text of one tokenizer (see the module docstring)."""

    tokenizer: object
    template: str = PROMPT_TEMPLATE
    chat: bool = False
    system_prompt: str | None = None  # None: the template's own default system turn, if it has one
    shots: tuple[Shot, ...] = ()

    def render(self, question: str) -> str:
        """The prompt of `question`."""
        return self.wrap(build_prompt(question, self.template))

    def wrap(self, instruction: str) -> str:
        """The prompt whose instruction (user turn) is `instruction`: shots and system prompt around it."""
        if self.chat:
            # A turn's content is stripped: the plain templates end with a newline that, inside a turn, would
            # sit before the end-of-turn token where the model saw none in its own chat training.
            messages = [{"role": "system", "content": self.system_prompt.strip()}] if self.system_prompt else []
            for shot in self.shots:
                messages.append({"role": "user", "content": build_prompt(shot.question, self.template).strip()})
                messages.append({"role": "assistant", "content": shot.solution.strip()})
            messages.append({"role": "user", "content": instruction.strip()})
            return chat_text(self.tokenizer, messages)
        shots = "".join(build_prompt(s.question, self.template) + s.solution + "\n\n" for s in self.shots)
        system = f"{self.system_prompt.strip()}\n\n" if self.system_prompt else ""
        return system + shots + instruction

    @property
    def end_id(self) -> int:
        """The token a trained response ends with: the end of the assistant turn, or EOS in plain text."""
        end = end_of_turn_id(self.tokenizer) if self.chat else None
        return self.tokenizer.eos_token_id if end is None else end


def prompt_format(
    tokenizer,
    template: str = PROMPT_TEMPLATE,
    chat_template: str = "auto",
    system_prompt: str | None = None,
    shots: tuple[Shot, ...] = (),
    where: str = "chat_template",
) -> PromptFormat:
    """The `PromptFormat` of `tokenizer` under the settings; ConfigError when chat_template is on and the
    tokenizer has none (`where` names the setting in the message)."""
    chat = uses_chat_template(tokenizer, chat_template, where)
    log.debug("prompts %s the chat template", "go through" if chat else "do not go through")
    return PromptFormat(tokenizer, template, chat, system_prompt or None, tuple(shots))


def stage_prompt_format(stage, tokenizer) -> PromptFormat:
    """The prompt format a recipe stage (`config.StageConfig`) trains and samples with."""
    cfg = stage.data
    where = f"stage {stage.name!r}: data.chat_template"
    return prompt_format(tokenizer, prompt_template(cfg.prompt), cfg.chat_template, cfg.system_prompt, where=where)
