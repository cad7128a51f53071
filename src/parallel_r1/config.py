"""Training recipes: typed dataclasses loaded from YAML and validated at load time.

A recipe is a list of stages run in order; each stage is a supervised cold start (`kind: sft`) or a
GRPO stage (`kind: grpo`). A stage starts from the previous stage's final model unless it names one.
Every field is documented next to its definition; `docs/training.md` shows complete recipes.

Mistakes are reported with the file, the line, the section and, for unknown keys, the closest valid
name, e.g. ``recipe.yaml:12: stages[1].grpo: unknown key 'clip_hi' (did you mean 'clip_high'?)``.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from parallel_r1.settings import (
    DEFAULT_VARIANT,
    ChatTemplateMode,
    ConfigError,
    RewardSchedule,
    SamplingSettings,
    Variant,
)
from parallel_r1.settings import require as _require
from parallel_r1.typed_yaml import Builder, Lines, location_name, merge_yaml, read_yaml

# The embedded default and its sequential baseline ship inside the package, so that `parallel-r1 run`
# works from any install; configs/tiny.yaml and configs/tiny_sequential.yaml link to them.
RECIPES = Path(__file__).resolve().parent / "recipes"
DEFAULT_RECIPE = RECIPES / "tiny.yaml"
BASELINE_RECIPE = RECIPES / "tiny_sequential.yaml"
CONTROL_RECIPE = RECIPES / "tiny_plain.yaml"  # the parallel recipe's script without its structure


@dataclass
class TinyModelConfig:
    """Sizes of the built-in tiny Llama (only used when name_or_path is "tiny")."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 688
    max_positions: int = 2048

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1")
        _require(self.hidden_size % self.num_heads == 0, "hidden_size must be a multiple of num_heads")


@dataclass
class ModelConfig:
    """The model a stage starts from."""

    name_or_path: str | None = None
    """A preset ("tiny", "smollm2-135m"), a local directory or a Hub id. Empty: the previous stage's
    final model (the first stage must name one)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype. Use float32 on CPU (no native bf16 there)."""
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = "sdpa"
    """Attention kernel; the Unseen mask needs one that takes a custom mask (sdpa, eager, flex_attention)."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Sizes of the "tiny" preset (ignored for other models)."""


@dataclass
class DataConfig:
    """Where a stage's examples come from."""

    source: str = "task"
    """"task" (the built-in arithmetic task), a dataset name known to `parallel_r1.data` (e.g.
    "gsm8k", "dapo_math_17k", "parallel_gsm8k") or a local .jsonl/.parquet path."""
    split: str | None = None
    """Dataset split; empty for the dataset's training split."""
    limit: int | None = None
    """Use at most this many examples (the first ones); empty for all."""
    task: Literal["arith", "search"] = "arith"
    """For source "task": which built-in task ("arith": a chain of operations on one quantity;
    "search": find the candidate that reaches a target, where independent tries pay off)."""
    task_size: int = 2000
    """For source "task": how many problems (or SFT records) to generate."""
    task_levels: list[int] | None = None
    """For source "task": difficulty levels (1-6); empty: the task's cold-start levels for SFT, its easy
    RL levels for GRPO."""
    task_style: Literal["parallel", "sequential", "plain", "thorough", "mixed", "choice", "planned"] = "parallel"
    """For source "task", SFT: how the programmatic teacher writes the solutions ("sequential": no block,
    for a baseline on the same problems; the search task also has "plain" (the parallel script with plain
    delimiters instead of tags), "thorough" (sequential, with the parallel script's tries), "mixed"
    (blocks only while three or more candidates remain), "choice" (there, a block on a coin's toss) and
    "planned" (blocks of 1 to 3 paths, each opened by a plan naming every path's candidate, for
    `rollout.plans: true`): see tasks/search.py)."""
    eval_size: int = 0
    """SFT: records held out for the eval loss (0: no eval)."""
    prompt: Literal["parallel", "sequential", "question", "bare", "minerva"] = "parallel"
    """Prompt template (`prompts.PROMPT_TEMPLATES`): "parallel" (the project's instruction to think in
    parallel, what `evaluate` uses), "sequential" (no mention of blocks), "question" ("Problem: <question>"
    alone: a short prompt for tiny models trained from scratch), "bare" (the question as it is, for a
    system_prompt that says how to answer), "minerva" ("Problem:" / "Solution:"). SFT records from a file
    are re-prompted with it."""
    chat_template: ChatTemplateMode = "auto"
    """The instruction as the user turn of the tokenizer's chat template, the response as the assistant
    turn (its end-of-turn token trained on, the template's other tokens not): "auto" when the tokenizer has
    one (the tiny model's has none), "on" (a stage whose tokenizer has none fails when it starts), "off"."""
    system_prompt: str | None = None
    """A system turn before the instruction (in plain text, a first paragraph); empty: none, or the chat
    template's own default."""

    def __post_init__(self) -> None:
        _require(self.limit is None or self.limit > 0, "limit must be > 0 or empty")
        _require(self.task_size > 0, "task_size must be > 0")
        _require(self.eval_size >= 0, "eval_size must be >= 0")


@dataclass
class SFTConfig:
    """Settings only the supervised (cold-start) trainer uses."""

    batch_size: int = 8
    """Sequences per forward pass on each process."""
    grad_accum: int = 1
    """Forward passes per optimiser step (gradient accumulation)."""
    epochs: int = 1
    """Passes over the training records (ignored when the stage sets max_steps)."""
    max_length: int = 1024
    """Longer prompt + response sequences are cut to this many tokens."""
    bucket_batches: int = 32
    """Length bucketing: each window of this many batches is sorted by length before batching, which
    cuts padding; 1 turns bucketing off."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "epochs", "max_length", "bucket_batches"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1")


@dataclass
class RolloutConfig(SamplingSettings):
    """How the engine samples responses during GRPO. The sampling keys (temperature, top_p, top_k,
    max_response_tokens, max_path_tokens, max_blocks, num_paths) and their checks are those of
    `parallel_r1.settings.SamplingSettings`; the variant is the stage's."""

    backend: Literal["hf", "vllm"] = "hf"
    """"hf": the built-in engine (shares the trained model; sampling log-probs are exact, so they serve
    as the old log-probs). "vllm": the vLLM backend on GPU (old log-probs are recomputed)."""
    max_batch_size: int = 64
    """Sequences the engine decodes at once (hf backend)."""
    vllm_gpu_memory_utilization: float = 0.3
    """vllm backend: share of the GPU memory vLLM may take (it runs next to the trained model)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        # The trainer scores tokens under softmax(logits / temperature): greedy decoding has no such policy.
        _require(self.temperature > 0, "temperature must be > 0")
        _require(self.max_batch_size >= 1, "max_batch_size must be >= 1")
        _require(0 < self.vllm_gpu_memory_utilization < 1, "vllm_gpu_memory_utilization must be in (0, 1)")


@dataclass
class RewardConfig:
    """The reward schedule (see `parallel_r1.settings.RewardSchedule`)."""

    kind: Literal["accuracy", "parallel", "alternating", "mid_training"] = "accuracy"
    """accuracy: correct_value / wrong_value. parallel: parallel_value for a correct answer with a
    well-formed block. alternating: the parallel reward on `parallel_steps` steps of every `window`.
    mid_training: parallel until `switch_step`, accuracy after."""
    window: int = 10
    """alternating: steps per window."""
    parallel_steps: int = 2
    """alternating: the last this many steps of each window use the parallel reward."""
    switch_step: int = 0
    """mid_training: the first step (counting from 0) that uses the accuracy reward alone."""
    correct_value: float = 1.0
    """Reward of a correct final answer."""
    wrong_value: float = -1.0
    """Reward of a wrong or missing final answer."""
    parallel_value: float = 1.2
    """Reward of a correct answer with a well-formed block while the parallel reward is on (the paper: 1.2)."""
    verify_timeout_s: float = 5.0
    """Seconds math-verify may spend on one answer before it counts as wrong."""
    format_error_value: float | None = -1.0
    """While the parallel reward is on, the most a response failing the strict format check can score,
    even with a correct answer (the reference's format gate: -1). Empty (null): no penalty, the bonus is
    only withheld."""
    speedup_value: float = 0.0
    """A correct answer also gains speedup_value * (1 - positions / tokens), positions its Unseen critical
    path (ThreadWeaver's acceleration reward; 0 under Seen and Threads decoding). 0 turns it off."""

    def __post_init__(self) -> None:
        _require(self.correct_value > self.wrong_value, "correct_value must be > wrong_value")
        _require(self.parallel_value >= self.correct_value, "parallel_value must be >= correct_value")
        _require(self.verify_timeout_s > 0, "verify_timeout_s must be > 0")
        _require(self.speedup_value >= 0, "speedup_value must be >= 0 (0 turns it off)")
        _require(
            self.format_error_value is None or self.format_error_value < self.correct_value,
            "format_error_value must be < correct_value (or empty: no format penalty)",
        )
        self.schedule()  # the schedule checks kind, window, parallel_steps and switch_step

    def schedule(self) -> RewardSchedule:
        """Which steps use the parallel reward."""
        return RewardSchedule(self.kind, self.window, self.parallel_steps, self.switch_step)


@dataclass
class GRPOConfig:
    """Settings only the GRPO trainer uses."""

    prompts_per_step: int = 8
    """Prompts sampled per training step (the reference: 256)."""
    n: int = 8
    """Responses sampled per prompt (the group size)."""
    mini_batch_size: int = 8
    """Prompts per optimiser step; prompts_per_step / mini_batch_size optimiser steps per epoch."""
    micro_batch_size: int = 16
    """Responses per forward pass on each process (gradients accumulate over a mini-batch); grouped rows
    take whole groups (at least one)."""
    update_rows: Literal["padded", "packed", "grouped"] = "grouped"
    """How the update (and a recomputation of old log-probs) lays out a micro-batch: padded, a left-padded
    row of prompt + response per response; packed, all of them side by side in one row without padding;
    grouped, packed with each group's prompt once, its n responses seeing it and themselves only (a
    prefix grouper). The three give the same log-probs and gradients up to float rounding (docs/training.md,
    "Packed rows"); grouped computes the prompt's forward and backward once per group instead of n times."""
    micro_batch_tokens: int = 0
    """packed / grouped: cut micro-batches by packed tokens (at most this many, at least one group or row)
    instead of by micro_batch_size responses. 0: by micro_batch_size."""
    ppo_epochs: int = 1
    """Passes over each step's rollouts."""
    clip_low: float = 0.2
    """The ratio is clipped below at 1 - clip_low."""
    clip_high: float = 0.28
    """The ratio is clipped above at 1 + clip_high (DAPO's clip-higher)."""
    advantage: Literal["grpo", "drgrpo"] = "grpo"
    """grpo: (r - mean) / std within each group; drgrpo: r - mean (no std normalisation)."""
    kl_coef: float = 0.0
    """Weight of the k3 KL estimate to the stage's starting model; 0 loads no reference model."""
    filter_zero_variance: bool = True
    """Drop groups whose rewards are all equal (their advantages are zero)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: after dropping the groups whose rewards are all equal, sample more prompts
    (the next ones of the data order) until the step has `prompts_per_step` informative groups or
    `max_refill_rounds` extra rounds were sampled. A round samples the missing count scaled by the step's
    informative share so far (at most `prompts_per_step`); informative groups beyond the count are not
    trained on. Needs filter_zero_variance. The metrics `sampling_rounds` and `prompts_sampled` say what a
    step took."""
    max_refill_rounds: int = 4
    """dynamic_sampling: extra sampling rounds a step may take after its first (verl's max_num_gen_batches
    counts the first too)."""
    overlong_filter: bool = False
    """DAPO's overlong filtering: a response cut at `rollout.max_response_tokens` (finish reason "length";
    the cap counts tokens, every path's and the inserted tags included, not positions) keeps its reward in
    its group's advantages but is masked from the loss."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment: a response longer than max_response_tokens - overlong_buffer tokens
    gets a reward penalty growing linearly to -overlong_penalty at the cap. Like the cap it counts tokens,
    not positions: in a parallel response every path's tokens and the inserted tags count. 0: off."""
    overlong_penalty: float = 1.0
    """The soft overlong punishment at the cap (DAPO: 1, the reward's scale)."""
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "token-mean"
    """How per-token losses of a mini-batch become one number (verl's loss_agg_mode names): token-mean, over
    every trained token (DAPO, the reference); seq-mean-token-sum, each response's sum, averaged over
    responses; seq-mean-token-mean, each response's mean, averaged over responses (the GRPO paper; GSPO)."""
    ratio_level: Literal["token", "sequence"] = "token"
    """token: a ratio per token (PPO, GRPO). sequence: GSPO's ratio per response, the geometric mean of its
    tokens' ratios, clipped once per response (GSPO clips at ~3e-4 / 4e-4, far tighter than token ratios)."""
    old_logprobs: Literal["auto", "engine", "recompute"] = "auto"
    """engine: use the sampling log-probs; recompute: a no-grad forward before the update; auto: engine
    when the backend guarantees they match the training forward (hf: same mask, positions and full-vocab
    softmax) and `tis_cap` is off, else recompute."""
    tis_cap: float | None = None
    """Truncated importance sampling (verl's TIS): each token's surrogate is weighted by
    min(exp(old - sampler), tis_cap), old being the trainer's recomputed log-prob and sampler the engine's,
    which corrects for a sampler whose probabilities differ from the trainer's (vLLM kernels, bf16, the
    unseen variant sampled by vLLM). Needs recomputed old log-probs. null: off; 2.0 is a common cap.
    `tis_mode` chooses the weight's level and what the cap does."""
    tis_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = "token_truncate"
    """With tis_cap (TRL's vllm_importance_sampling_mode names): token_*: a weight per token; sequence_*: one
    per response, exp(sum over its tokens of old - sampler); *_truncate: min(weight, tis_cap); *_mask: the
    weight, or 0 above tis_cap (the response is dropped from the loss; sequence_mask is TRL's default)."""
    behaviour_logprobs: bool | None = None
    """Log-probs of the distribution the engine sampled from: its state-dependent tag bans (only `</Path>`
    closes a path, `<Parallel>` banned at the block cap, ...) and top-k/top-p, renormalised. The engine
    records them and the trainer replays the same warp, so the ratio and the gradient refer to the policy
    that acted; off, both use the full-vocabulary softmax. null: on for the hf backend, where the replay is
    exact; off for vLLM, whose bans are a finite logit bias (-100) the trainer cannot replay, so true is an
    error there. docs/training.md, "Behaviour log-probs"."""
    mismatch_threshold: float = 0.1
    """A trained token counts in the `mismatch_share` metric when its sampling and training log-probs differ
    by more than this."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        for name in ("prompts_per_step", "n", "mini_batch_size", "micro_batch_size", "ppo_epochs"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1")
        _require(self.micro_batch_tokens >= 0, "micro_batch_tokens must be >= 0 (0: cut by micro_batch_size)")
        _require(
            self.micro_batch_tokens == 0 or self.update_rows != "padded",
            "micro_batch_tokens cuts packed rows: it needs update_rows packed or grouped",
        )
        _require(self.n >= 2, "n must be >= 2 (advantages are relative to the group)")
        _require(
            self.prompts_per_step % self.mini_batch_size == 0,
            f"prompts_per_step ({self.prompts_per_step}) must be a multiple of "
            f"mini_batch_size ({self.mini_batch_size})",
        )
        _require(0 <= self.clip_low < 1, "clip_low must be in [0, 1)")
        _require(self.clip_high >= 0, "clip_high must be >= 0")
        _require(self.kl_coef >= 0, "kl_coef must be >= 0")
        _require(self.tis_cap is None or self.tis_cap > 0, "tis_cap must be > 0 (or null to turn it off)")
        _require(
            self.tis_cap is None or self.old_logprobs != "engine",
            "tis_cap weighs the trainer's log-probs against the sampler's: it needs old_logprobs auto or recompute",
        )
        _require(
            self.tis_mode == "token_truncate" or self.tis_cap is not None,
            f"tis_mode {self.tis_mode} needs tis_cap (the threshold it truncates or masks at)",
        )
        _require(self.mismatch_threshold > 0, "mismatch_threshold must be > 0")
        _require(
            not self.dynamic_sampling or self.filter_zero_variance,
            "dynamic_sampling refills the groups filter_zero_variance drops: it needs filter_zero_variance true",
        )
        _require(self.max_refill_rounds >= 1, "max_refill_rounds must be >= 1")
        _require(
            0 <= self.overlong_buffer < self.rollout.max_response_tokens,
            f"overlong_buffer must be in [0, rollout.max_response_tokens ({self.rollout.max_response_tokens}))",
        )
        _require(self.overlong_penalty > 0, "overlong_penalty must be > 0")
        _require(
            not (self.rollout.distinct_plans and self.rollout.backend == "vllm"),
            "rollout.distinct_plans needs the hf backend (vLLM samples a plan as one request)",
        )
        _require(
            not (self.behaviour_logprobs and self.rollout.backend == "vllm"),
            "behaviour_logprobs needs the hf backend (vLLM bans by a finite logit bias the trainer cannot replay)",
        )


@dataclass
class StageConfig:
    """One stage of a recipe: what to train, on which data, from which model, with which settings."""

    name: str
    """Names the stage's folder in the run directory; unique within a recipe."""
    kind: Literal["sft", "grpo"]
    variant: Variant = DEFAULT_VARIANT
    """seen: causal mask. unseen: paths are isolated from each other (structured mask and positions).
    threads: paths isolated, and what follows a block reads it as sequential text (re-prefill at join, what
    the vLLM backend samples; docs/attention.md). The same variant is used to sample and to train."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warmup (transformers' schedulers)."""
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm; 0 turns clipping off."""
    max_steps: int | None = None
    """Optimiser steps (SFT) or training steps (GRPO). SFT may leave it empty to run `sft.epochs`."""
    save_every: int = 0
    """Write a checkpoint every this many steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept in the stage folder (older ones are deleted)."""
    eval_every: int = 0
    """SFT: eval loss every this many steps (0: only at the end, when data.eval_size > 0)."""
    log_every: int = 1
    """Console log every this many steps (the JSONL gets every step)."""
    seed: int | None = None
    """Seed of this stage (data order, sampling); empty: the recipe's seed."""
    sft: SFTConfig | None = None
    """Only for kind sft (defaults filled in)."""
    grpo: GRPOConfig | None = None
    """Only for kind grpo (defaults filled in)."""

    def __post_init__(self) -> None:
        _require(bool(self.name) and "/" not in self.name, f"stage name {self.name!r} must be non-empty, no '/'")
        _require(self.lr > 0, "lr must be > 0")
        _require(self.weight_decay >= 0, "weight_decay must be >= 0")
        _require(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam betas must be in [0, 1)")
        _require(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        _require(self.max_grad_norm >= 0, "max_grad_norm must be >= 0")
        _require(self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1 or empty")
        for name in ("save_every", "eval_every"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0")
        _require(self.keep_last >= 1, "keep_last must be >= 1")
        _require(self.log_every >= 1, "log_every must be >= 1")
        if self.kind == "sft":
            _require(self.grpo is None, "a stage of kind sft takes no grpo section")
            self.sft = self.sft or SFTConfig()
        else:
            _require(self.sft is None, "a stage of kind grpo takes no sft section")
            _require(self.max_steps is not None, "a grpo stage needs max_steps")
            self.grpo = self.grpo or GRPOConfig()
            rollout = self.grpo.rollout
            _require(
                rollout.max_depth == 1 or (self.variant != "threads" and rollout.backend == "hf"),
                "rollout.max_depth > 1 (nested blocks) needs the seen or unseen variant and the hf backend",
            )


@dataclass
class LoggingConfig:
    """Where metrics go besides the JSONL file, which is always written."""

    tensorboard: bool = False
    """Also write tensorboard event files (needs `pip install tensorboard`)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb` and a login)."""
    wandb_project: str = "parallel-r1"
    progress: bool = True
    """Show a progress bar on the console."""


@dataclass
class Recipe:
    """A training run: stages run in order, each from the previous one's final model."""

    stages: list[StageConfig]
    name: str = "run"
    """Default run folder name (runs/<name>) and the wandb run name."""
    seed: int = 0
    """Seed of every stage that sets none."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        _require(len(self.stages) >= 1, "a recipe needs at least one stage")
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        _require(not dupes, f"stage names must be unique (repeated: {', '.join(dupes)})")
        _require(
            self.stages[0].model.name_or_path is not None,
            f"the first stage ({self.stages[0].name}) must name a model (model.name_or_path)",
        )
        model = None
        for stage in self.stages:
            model = stage.model.name_or_path or model
            # The tiny preset's tokenizer has no chat template; other models are checked when their stage starts.
            _require(
                not (model == "tiny" and stage.data.chat_template == "on"),
                f"stage {stage.name!r}: data.chat_template is on, but the tiny model's tokenizer has no chat template",
            )

    def stage_seed(self, stage: StageConfig) -> int:
        return self.seed if stage.seed is None else stage.seed


def recipe_from_dict(data: Any, source: str = "<recipe>", lines: Lines | None = None) -> Recipe:
    """Validate plain data (as read from YAML) into a Recipe."""
    return Builder(source, lines or {}).build_dataclass(Recipe, data, ())


def _read_recipe(path: Path, chain: tuple[Path, ...] = ()) -> tuple[Any, Lines]:
    """The data and lines of the recipe file `path`, with what it `extends` merged in beneath it."""
    here = path.resolve()  # a symlinked recipe (configs/tiny.yaml) extends relative to where it lives
    if here in chain:
        cycle = " -> ".join(p.name for p in (*chain[chain.index(here) :], here))
        raise ConfigError(f"{path}: extends itself through {cycle}")
    data, lines = read_yaml(path.read_text(), str(path))
    if not isinstance(data, dict) or "extends" not in data:
        return data, lines
    data = dict(data)
    parent = data.pop("extends")
    where = f"{path}:{lines[('extends',)][1]}"
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{where}: extends: expected the path of a recipe file, got {parent!r}")
    base_path = here.parent / parent
    if not base_path.is_file():
        raise ConfigError(f"{where}: extends {parent!r}: no such recipe file ({base_path})")
    base, base_lines = _read_recipe(base_path, (*chain, here))
    lines = {loc: w for loc, w in lines.items() if loc[:1] != ("extends",)}
    return merge_yaml(base, base_lines, data, lines)


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Parse and validate a recipe from YAML text; `source` names it in error messages. Text that `extends`
    another file goes through `load_recipe`, which knows where the file is."""
    data, lines = read_yaml(text, source)
    if isinstance(data, dict) and "extends" in data:
        raise ConfigError(f"{source}: extends needs a recipe file (load_recipe), not text")
    return recipe_from_dict(data, source, lines)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file. A recipe may start with `extends: <file>` (relative to its own
    folder) and state only what differs from that recipe: mappings merge, `stages` merge by stage name
    (a new name adds a stage at the end), any other value or list replaces the base's."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such recipe file")
    data, lines = _read_recipe(path)
    return recipe_from_dict(data, str(path), lines)


def default_recipe() -> Recipe:
    """The embedded default: SFT then GRPO on the built-in task with the tiny model (configs/tiny.yaml)."""
    return load_recipe(DEFAULT_RECIPE)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe) -> str:
    """YAML text that `parse_recipe` turns back into an equal Recipe."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def override(recipe: Recipe, assignments: list[str]) -> Recipe:
    """A copy of `recipe` with `key=value` assignments applied, e.g. "stages.0.lr=1e-5" or
    "stages.grpo.grpo.n=4" (a stage by index or by name). Values are YAML ("4", "true", "[1, 2]")."""
    data = recipe_to_dict(recipe)
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        _require(bool(sep) and bool(key), f"--set {assignment!r}: expected key=value")
        parts = key.strip().split(".")
        node: Any = data
        where: list[Any] = []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                index = _list_index(node, part, assignment)
                where.append(index)
                if last:
                    node[index] = yaml.safe_load(raw)
                else:
                    node = node[index]
                continue
            if not isinstance(node, dict) or part not in node:
                options = list(node) if isinstance(node, dict) else []
                hint = difflib.get_close_matches(part, options, n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ConfigError(f"--set {assignment!r}: {location_name(tuple(where))}: unknown key {part!r}{extra}")
            where.append(part)
            if last:
                node[part] = yaml.safe_load(raw)
            else:
                if node[part] is None:
                    node[part] = {}
                node = node[part]
    return recipe_from_dict(data, source="recipe after --set")


def _list_index(items: list, part: str, assignment: str) -> int:
    if part.lstrip("-").isdigit():
        index = int(part)
        _require(-len(items) <= index < len(items), f"--set {assignment!r}: index {index} out of range")
        return index % len(items)
    names = [item.get("name") for item in items if isinstance(item, dict)]
    _require(part in names, f"--set {assignment!r}: no stage named {part!r} (stages: {', '.join(map(str, names))})")
    return names.index(part)
