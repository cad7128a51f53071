"""The settings every layer shares, declared once with their defaults, help and checks: sampling, the reward
schedule, the held-out evaluation and the study.

With `config` (the recipes and their loading) this is the configuration layer: it imports nothing else of
the package and no torch, so that any module, the CLI's argument parser included, can read it for free.
Every class checks its values when it is built, and raises `ConfigError` (a `ValueError`) naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class InputError(ValueError):
    """Input that cannot be used (a data file, a setting, a model name, a teacher server), as opposed to a bug:
    the CLI prints its message, which names the file and line or the setting, on one line and exits with 2."""


class ConfigError(InputError):
    """A setting that cannot be used; the message names the file, line and field where there is one."""


def require(ok: bool, message: str) -> None:
    """Raise `ConfigError(message)` unless `ok`."""
    if not ok:
        raise ConfigError(message)


def _knob(default: Any, text: str) -> Any:
    """A field with its help text (the CLI's --help shows it)."""
    return field(default=default, metadata={"help": text})


Variant = Literal["unseen", "seen", "threads"]
VARIANTS: tuple[str, ...] = ("unseen", "seen", "threads")
# The paper's structured variant is the default wherever a variant is not given (a recipe's stage, the
# engine, `eval` and `generate`); the embedded recipes name theirs.
DEFAULT_VARIANT = "unseen"
BACKENDS = ("hf", "vllm")  # rollout engines (`engine.make_engine`)
TASKS = ("arith", "search")
"""The built-in tasks (`parallel_r1.task.task_module`)."""
ChatTemplateMode = Literal["auto", "on", "off"]
CHAT_TEMPLATE_MODES: tuple[str, ...] = ("auto", "on", "off")
"""Whether prompts go through the tokenizer's chat template (`prompts.uses_chat_template`); auto: when it
has one, so that a model is prompted the way its model card shows, and the tiny model in plain text."""


# ---------------------------------------------------------------------------------------------------
# Sampling.


@dataclass
class SamplingSettings:
    """The sampling knobs, declared once: a recipe's `grpo.rollout` (`config.RolloutConfig`), `EvalConfig` and
    the `generate`/`eval` flags (`--max-response-tokens`, ...) all take these names, defaults and checks."""

    temperature: float = _knob(1.0, "softmax temperature; 0 samples greedily")
    top_p: float = _knob(1.0, "nucleus sampling mass (1 turns it off)")
    top_k: int = _knob(0, "sample among the k most likely tokens (0 turns it off)")
    max_response_tokens: int = _knob(3000, "cap on a whole response, every path's tokens and inserted tags included")
    max_path_tokens: int = _knob(
        1024, "cap on one path, its <Path> and </Path> included; a path cut short gets a closing tag not trained on"
    )
    max_blocks: int = _knob(4, "parallel blocks allowed per response; at the cap <Parallel> is banned")
    num_paths: int = _knob(2, "paths forked at each <Parallel> (Unseen decoding) when plans is off")
    plans: bool = _knob(
        False,
        "planned blocks: after <Parallel> the model writes a plan, one line per path, and the engine forks one path "
        "per line (unseen, threads), each starting with its line (inserted, not trained on); the strict format check "
        "requires the plan",
    )
    max_paths: int = _knob(
        4, "plans: the most paths of a block; the plan is closed by an inserted <Path> at that many lines"
    )
    distinct_plans: bool = _knob(
        False,
        "plans: a plan line may not start with a token that began an earlier line of its plan, so that no two "
        "paths of a block start alike (the built-in task's plan lines begin with their candidate); hf engine",
    )
    max_depth: int = _knob(
        1,
        "how deep blocks nest: a path may open a block of its own while it sits in fewer than max_depth blocks, "
        "and <Parallel> is banned in a path at the cap (1: blocks do not nest); seen and unseen, without plans",
    )

    def __post_init__(self) -> None:
        require(self.temperature >= 0, "temperature must be >= 0")
        require(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        require(self.top_k >= 0, "top_k must be >= 0 (0 disables it)")
        require(self.max_response_tokens >= 1, "max_response_tokens must be >= 1")
        require(self.max_path_tokens >= 3, "max_path_tokens must be >= 3 (<Path>, one token, </Path>)")
        require(self.max_blocks >= 0, "max_blocks must be >= 0")
        require(self.num_paths >= 2, "num_paths must be >= 2 (a block holds at least two paths)")
        require(self.max_paths >= 1, "max_paths must be >= 1")
        require(self.max_depth >= 1, "max_depth must be >= 1 (1: blocks do not nest)")
        require(self.max_depth == 1 or not self.plans, "nested blocks (max_depth > 1) do not take plans yet")
        require(self.plans or not self.distinct_plans, "distinct_plans needs plans: true")


SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingSettings))


@dataclass
class SamplingParams(SamplingSettings):
    """Everything one `generate` call of an engine needs: the knobs, and these."""

    variant: str = _knob(DEFAULT_VARIANT, "unseen (structured), seen (causal) or threads (re-prefill at join)")
    seed: int | None = _knob(None, "seed of the sampler; empty: a fresh one")
    open_block: bool = _knob(
        False,
        "begin every response with an inserted (not sampled, not trained on) <Parallel>: a prefill that shows the "
        "format on a model that has not learned yet to open blocks by itself; counts towards max_blocks",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.variant in VARIANTS, f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        require(not self.open_block or self.max_blocks >= 1, "open_block needs max_blocks >= 1")
        require(
            self.max_depth == 1 or self.variant != "threads",
            "the threads variant does not nest blocks (its re-prefill at join is one level deep): max_depth must be 1",
        )


# ---------------------------------------------------------------------------------------------------
# Rewards.

SCHEDULE_KINDS = ("accuracy", "parallel", "alternating", "mid_training")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"RewardSchedule.{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class RewardSchedule:
    """Which training steps add the parallel reward to the accuracy reward (steps count from 0).

    - ``accuracy``: never; ``parallel``: always.
    - ``alternating``: in every window of `window` steps, the last `parallel_steps` use accuracy + parallel
      and the others accuracy alone (the paper's Unseen S2 stage: window 10, 2 parallel steps, so steps
      8, 9, 18, 19, ...).
    - ``mid_training``: accuracy + parallel for steps 0 .. `switch_step` - 1, accuracy alone from
      `switch_step` on (the paper's scaffold for its best AIME25 result).
    """

    kind: str  # one of SCHEDULE_KINDS
    window: int = 10
    parallel_steps: int = 2
    switch_step: int = 0

    def __post_init__(self) -> None:
        require(self.kind in SCHEDULE_KINDS, f"RewardSchedule.kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        _check_int("window", self.window, 1)
        _check_int("parallel_steps", self.parallel_steps, 0)
        _check_int("switch_step", self.switch_step, 0)
        require(
            self.parallel_steps <= self.window,
            f"RewardSchedule.parallel_steps ({self.parallel_steps}) cannot exceed window ({self.window})",
        )
        require(
            self.kind != "mid_training" or self.switch_step >= 1,
            "RewardSchedule(kind='mid_training') needs switch_step >= 1 (the first accuracy-only step)",
        )

    def parallel_active(self, step: int) -> bool:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        if self.kind == "accuracy":
            return False
        if self.kind == "parallel":
            return True
        if self.kind == "alternating":
            return step % self.window >= self.window - self.parallel_steps
        return step < self.switch_step


# ---------------------------------------------------------------------------------------------------
# Evaluation.

DEFAULT_BENCHMARKS = ("aime24", "aime25", "amc23", "math500", "gsm8k")  # what `parallel-r1 eval` runs


@dataclass
class EvalConfig(SamplingSettings):
    """How `evaluate` samples a benchmark: the sampling knobs, and these. Its defaults are those of
    `parallel-r1 eval`; `run` and `study` build theirs from the recipe and `EvalSettings`."""

    k: int = _knob(16, "samples per problem")
    seed: int = _knob(0, "seed of the first chunk of problems (the next chunks count up from it)")
    variant: str = _knob(DEFAULT_VARIANT, "decoding variant: unseen, seen or threads")
    max_batch_size: int = _knob(64, "rollouts decoded together")
    backend: str = _knob("hf", "rollout engine: hf, or vllm (from the model's folder; a preset is saved to one first)")
    verify_timeout_s: float = _knob(5.0, "seconds math-verify may spend on one answer before it counts as wrong")
    template: str | None = _knob(None, "prompt template with {question}; empty: prompts.PROMPT_TEMPLATE")
    chat_template: str = _knob(
        "auto", "the instruction as the user turn of the tokenizer's chat template: auto (when it has one), on, off"
    )
    system_prompt: str | None = _knob(
        None, "a system turn before it (plain text: a first paragraph); empty: the chat template's default"
    )
    shots: int = _knob(0, "worked examples before each problem, drawn from shots_from (never the evaluated set)")
    shots_from: str | None = _knob(
        None, "dataset of the shots, with worked solutions (a name or a file); empty: the benchmark's training split"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.k >= 1, "k must be >= 1")
        require(
            self.chat_template in CHAT_TEMPLATE_MODES,
            f"chat_template must be one of {', '.join(CHAT_TEMPLATE_MODES)}, got {self.chat_template!r}",
        )
        require(self.shots >= 0, "shots must be >= 0")
        require(self.variant in VARIANTS, f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        require(self.max_batch_size >= 1, "max_batch_size must be >= 1")
        require(self.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        require(self.verify_timeout_s > 0, "verify_timeout_s must be > 0")


@dataclass
class EvalSettings:
    """The held-out evaluation that `run` and `study` do after every stage: which problems and how many
    samples. Everything else is `EvalConfig`'s, the sampling caps those of the recipe's last GRPO stage.
    `k` and `batch_size` differ from `parallel-r1 eval`'s on purpose: a run evaluates every stage of every
    recipe on a CPU, so it draws fewer samples per problem, in larger batches of the tiny model."""

    problems_per_level: int = _knob(64, "held-out problems of each evaluated level")
    levels: tuple[int, ...] | None = _knob(None, "difficulty levels evaluated; empty: the task's EVAL_LEVELS")
    task: str | None = _knob(None, "built-in task of the problems; empty: the one the recipes train on")
    k: int = _knob(4, "samples per problem")
    batch_size: int = _knob(128, "rollouts decoded together")
    temperature: float = _knob(EvalConfig.temperature, "softmax temperature of the samples")
    seed: int = _knob(EvalConfig.seed, "seed of the problems and of the samples")

    def __post_init__(self) -> None:
        require(self.problems_per_level >= 1, "problems_per_level must be >= 1")
        require(self.levels is None or len(self.levels) >= 1, "levels must name at least one level (or be empty)")
        require(self.levels is None or all(isinstance(v, int) and v >= 1 for v in self.levels), "levels must be >= 1")
        require(self.task is None or self.task in TASKS, f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        require(self.k >= 1, "k must be >= 1")
        require(self.batch_size >= 1, "batch_size must be >= 1")
        require(self.temperature >= 0, "temperature must be >= 0")


# ---------------------------------------------------------------------------------------------------
# The study.

STUDY_RECIPES = Path(__file__).resolve().parent / "recipes" / "study"
ARMS = (
    "sequential",
    "thorough",
    "plain",
    "seen",
    "unseen",
    "unseen_kl",
    "mixed_s1",
    "mixed_s2",
    "mixed_mid",
    "mixed_acc",
)
# Arms with a recipe in STUDY_RECIPES that the default study does not run (name them in `arms`).
OPTIONAL_ARMS = ("unseen_planned", "unseen_distinct", "choice_s1", "choice_s2", "choice_mid", "choice_acc")
SEEDS = (0, 1, 2)
SWEEP_LRS = (3.0e-5, 1.0e-4, 3.0e-4)  # the RL learning rates `study --sweep` tries by default


def study_eval_settings() -> EvalSettings:
    """The study's evaluation: 64 held-out problems of each evaluated level, 8 samples each (maj@m up to 8)."""
    return EvalSettings(problems_per_level=64, k=8)


@dataclass
class StudySettings:
    """What `parallel-r1 study` runs: which arms, over which RL seeds, evaluated how."""

    arms: tuple[str, ...] = _knob(ARMS, "the arms compared, each a recipe <recipes_dir>/<arm>.yaml")
    seeds: tuple[int, ...] = _knob(SEEDS, "seeds; every seed trains its own SFT models and GRPO stages")
    eval: EvalSettings = field(default_factory=study_eval_settings, metadata={"help": "the held-out evaluation"})
    recipes_dir: Path = _knob(STUDY_RECIPES, "folder of the arms' recipes")
    workers: int = _knob(2, "jobs (an SFT or an arm's GRPO stages, with its evaluation) run side by side")
    threads: int = _knob(1, "torch threads of each worker process")

    def __post_init__(self) -> None:
        require(len(self.arms) >= 1, "a study needs at least one arm")
        require(len(set(self.arms)) == len(self.arms), f"arms must be distinct, got {', '.join(self.arms)}")
        if Path(self.recipes_dir) == STUDY_RECIPES:  # another folder may hold arms of its own
            known = ARMS + OPTIONAL_ARMS
            unknown = [a for a in self.arms if a not in known]
            require(not unknown, f"unknown study arm(s) {', '.join(unknown)} (arms: {', '.join(known)})")
        require(len(self.seeds) >= 1, "a study needs at least one seed")
        require(len(set(self.seeds)) == len(self.seeds), "seeds must be distinct")
        require(all(isinstance(s, int) and s >= 0 for s in self.seeds), "seeds must be integers >= 0")
        require(isinstance(self.eval, EvalSettings), "eval must be an EvalSettings")
        require(
            self.workers >= 1 and self.threads >= 1,
            f"workers and threads must be >= 1, got {self.workers}, {self.threads}",
        )
