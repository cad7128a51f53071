"""The `parallel-r1` command line. Each sub-command is a thin wrapper over a module's public API.

Bad input to any command (a data file, a recipe, a model path, a teacher server) ends in one
``error: ...`` line that names the file and line or the setting, and exit status 2; ``--debug`` shows the
traceback instead. Any other exception is a bug: it keeps its traceback, and a last line says so.

Only light modules are imported up here: each command imports what it runs (torch, transformers, the
engine, the trainers) when it runs, so that `--help`, `check`, `view` and `analyze` start at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import traceback
import typing
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

from parallel_r1 import check as response_format
from parallel_r1.config import ConfigError, default_recipe, load_recipe, override
from parallel_r1.prompts import PROMPT_TEMPLATES
from parallel_r1.settings import (
    ARMS,
    BACKENDS,
    CHAT_TEMPLATE_MODES,
    DEFAULT_BENCHMARKS,
    DEFAULT_VARIANT,
    SAMPLING_FIELDS,
    SEEDS,
    SWEEP_LRS,
    VARIANTS,
    EvalConfig,
    EvalSettings,
    InputError,
    SamplingParams,
    SamplingSettings,
    StudySettings,
    study_eval_settings,
)

log = logging.getLogger("parallel_r1")

# What bad input raises: InputError (ConfigError, the readers' errors naming file and line, a teacher server
# that does not answer; `format.InputError` for the check command's files) and OSError (a missing file or
# model). A missing optional package (tensorboard, wandb, vllm) is one too; see `_is_input_error`.
INPUT_ERRORS = (InputError, response_format.InputError, OSError)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
    )
    # accelerate reports every file of every checkpoint it writes at INFO; our own log names the checkpoint.
    logging.getLogger("accelerate").setLevel(logging.DEBUG if verbose else logging.WARNING)


# ---------------------------------------------------------------------------------------------------
# Sampling flags, derived from `settings.SamplingSettings`.


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """--temperature, --top-p, --top-k, --max-response-tokens, --max-path-tokens, --max-blocks,
    --num-paths, --plans/--no-plans, --max-paths (one per `SamplingSettings` field, with its default and
    help), --variant and --seed."""
    hints = typing.get_type_hints(SamplingSettings)
    defaults = SamplingSettings()
    for field in dataclasses.fields(SamplingSettings):
        default = getattr(defaults, field.name)
        kind = {"action": argparse.BooleanOptionalAction} if hints[field.name] is bool else {"type": hints[field.name]}
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            default=default,
            help=f"{field.metadata['help']} (default: {default})",
            **kind,
        )
    parser.add_argument(
        "--variant", choices=VARIANTS, default=DEFAULT_VARIANT, help=f"decoding variant (default: {DEFAULT_VARIANT})"
    )
    parser.add_argument("--seed", type=int, default=0)


def _sampling_values(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in SAMPLING_FIELDS}


def _add_prompt_flags(parser: argparse.ArgumentParser) -> None:
    """--chat-template and --system-prompt, as `settings.EvalConfig` declares them."""
    help_of = {f.name: f.metadata["help"] for f in dataclasses.fields(EvalConfig)}
    parser.add_argument(
        "--chat-template",
        choices=CHAT_TEMPLATE_MODES,
        default=EvalConfig.chat_template,
        help=f"{help_of['chat_template']} (default: {EvalConfig.chat_template})",
    )
    parser.add_argument("--system-prompt", help=help_of["system_prompt"])


# ---------------------------------------------------------------------------------------------------
# The commands.


def _add_check_parser(sub) -> None:
    check = sub.add_parser("check", help="strictly validate the parallel format of the responses in a JSONL file")
    check.add_argument("file", help="JSONL file, one record a line")
    check.add_argument("--field", default="response", help="record field holding the response (default: response)")
    check.add_argument("--json", action="store_true", help="print one JSON object per record")
    check.add_argument("--plans", action="store_true", help="check the planned format (a plan opens every block)")
    check.add_argument(
        "--max-depth", type=int, default=1, help="how deep blocks may nest (default 1: a block in a path is an error)"
    )
    check.set_defaults(func=_cmd_check)


def _cmd_check(args) -> int:
    if args.max_depth < 1:
        raise InputError(f"--max-depth must be at least 1, got {args.max_depth}")
    results = response_format.check_file(args.file, args.field, plans=args.plans, max_depth=args.max_depth)
    if args.json:
        for result in results:
            print(json.dumps(result))
    else:
        print(response_format.check_report(args.file, results))
    return 0 if all(r["valid"] for r in results) else 1


def _add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="sample k responses per benchmark problem and report mean@k, pass@k, maj@k")
    ev.add_argument(
        "--model", nargs="+", required=True, help="model preset, local directory or Hub id (several: one table)"
    )
    ev.add_argument(
        "--benchmarks",
        default=",".join(DEFAULT_BENCHMARKS),
        help=f"comma-separated names ({', '.join(DEFAULT_BENCHMARKS)}) or name=path.jsonl",
    )
    defaults = EvalConfig()
    _count_flag(ev, "--k", defaults.k, "samples per problem")
    ev.add_argument("--data-dir", help="read benchmarks from local files here (aime24.jsonl, gsm8k_test.jsonl, ...)")
    ev.add_argument("--limit", type=int, help="first N problems of each benchmark")
    _add_sampling_flags(ev)
    _count_flag(ev, "--batch-size", defaults.max_batch_size, "rollouts decoded together")
    ev.add_argument("--backend", choices=BACKENDS, default=defaults.backend, help="rollout engine (default: hf)")
    ev.add_argument(
        "--template",
        help=f"prompt: {', '.join(PROMPT_TEMPLATES)}, or a text file with {{question}} "
        "(default: parallel; minerva with --shots)",
    )
    _add_prompt_flags(ev)
    ev.add_argument(
        "--shots",
        type=int,
        default=defaults.shots,
        help="worked examples before each problem, in the Minerva layout with the minerva template, drawn from "
        "the benchmark's training split (never the evaluated one; a base model's few-shot evaluation)",
    )
    ev.add_argument(
        "--shots-from",
        help="dataset of the shots: a name (its training split) or a file with question, answer and a worked "
        "solution (a solution field, or a GSM8K answer with ####); default: gsm8k's train split "
        "(under --data-dir: gsm8k_train.jsonl)",
    )
    ev.add_argument("--out", help="write results (JSON) here, and the samples next to it (.samples.jsonl)")
    ev.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from rich.markdown import Markdown

    from parallel_r1.evaluate import markdown_table, run_eval

    name = args.template or ("minerva" if args.shots else "parallel")
    if name in PROMPT_TEMPLATES:
        template = PROMPT_TEMPLATES[name]
    elif Path(name).is_file():
        template = Path(name).read_text(encoding="utf-8")
    else:
        raise FileNotFoundError(f"--template {name}: neither {', '.join(PROMPT_TEMPLATES)} nor a file")
    cfg = EvalConfig(
        **_sampling_values(args),
        k=args.k,
        seed=args.seed,
        variant=args.variant,
        max_batch_size=args.batch_size,
        backend=args.backend,
        template=template,
        chat_template=args.chat_template,
        system_prompt=args.system_prompt,
        shots=args.shots,
        shots_from=args.shots_from,
    )
    benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    results = run_eval(args.model, benchmarks, cfg, data_dir=args.data_dir, limit=args.limit, out=args.out)
    console = Console()
    table = markdown_table(results)
    # Piped output keeps the markdown source, which pastes into a README as it is.
    if console.is_terminal:
        console.print(Markdown(table))
    else:
        print(table)
    return 0


def _add_data_parser(sub) -> None:
    data = sub.add_parser("data", help="data tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    gen = data_sub.add_parser("generate", help="cold-start data from a teacher behind an OpenAI-compatible API")
    gen.add_argument("--teacher-url", required=True, help="base URL of the server (http://host:port or .../v1)")
    gen.add_argument("--model", required=True, help="the teacher's model name on that server")
    gen.add_argument("--dataset", default="gsm8k", help="benchmark name or local .jsonl/.parquet with question/answer")
    gen.add_argument("--split", help="dataset split (default: the dataset's own)")
    gen.add_argument("--out", default="coldstart.jsonl", help="kept outputs are appended here (resumable)")
    gen.add_argument("--limit", type=int, help="first N problems")
    gen.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    gen.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    gen.add_argument("--retries", type=int, default=3, help="retries on timeouts, connection errors, 429 and 5xx")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--max-response-tokens", type=int, default=4096, help="cap on the teacher's reply")
    gen.add_argument(
        "--chat-template",
        choices=CHAT_TEMPLATE_MODES,
        default="auto",
        help="auto, on: the instruction as the user turn of a chat-completions request (the server applies the "
        "teacher's template); off: a plain completions request (default: auto)",
    )
    gen.add_argument("--system-prompt", help="a system turn before the instruction")
    gen.set_defaults(func=_cmd_data_generate)


def _cmd_data_generate(args) -> int:
    from parallel_r1.coldstart import TeacherConfig, run_generate

    cfg = TeacherConfig(
        url=args.teacher_url,
        model=args.model,
        temperature=args.temperature,
        max_tokens=args.max_response_tokens,
        timeout_s=args.timeout,
        retries=args.retries,
        concurrency=args.concurrency,
        chat_template=args.chat_template,
        system_prompt=args.system_prompt,
    )
    report = run_generate(cfg, args.dataset, args.out, limit=args.limit, split=args.split)
    log.info("%s: %s", args.out, report.describe())
    return 0


def _add_view_parser(sub) -> None:
    view = sub.add_parser("view", help="write a self-contained HTML page to read rollouts")
    view.add_argument("inputs", nargs="+", help="rollout JSONL files, run directories or eval result JSON")
    view.add_argument("--out", default="rollouts.html")
    view.add_argument("--limit", type=int, default=2000, help="at most this many samples on the page")
    view.set_defaults(func=_cmd_view)


def _cmd_view(args) -> int:
    from parallel_r1.viewer import write_viewer

    log.info("wrote %s", write_viewer(args.inputs, args.out, limit=args.limit))
    return 0


def _add_analyze_parser(sub) -> None:
    analyze = sub.add_parser("analyze", help="strategy evolution: where blocks appear, their role, path agreement")
    analyze.add_argument("inputs", nargs="+", help="rollout JSONL files, run directories or eval result JSON")
    analyze.add_argument("--out", default="analysis", help="directory for summary.json and strategy.png")
    analyze.set_defaults(func=_cmd_analyze)


def _cmd_analyze(args) -> int:
    from parallel_r1.analysis import run_analysis

    summaries = run_analysis(args.inputs, args.out)
    log.info("%d groups analysed; wrote %s/summary.json and strategy.png", len(summaries), args.out)
    return 0


def _add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="run a training recipe (SFT and GRPO stages); resumes a killed run")
    train.add_argument("--config", help="recipe YAML (default: the embedded tiny recipe, configs/tiny.yaml)")
    train.add_argument("--run-dir", help="output folder (default: runs/<recipe name>); an existing one is resumed")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set stages.0.lr=1e-5 (repeatable)",
    )
    train.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from parallel_r1.recipe import run_recipe

    recipe = load_recipe(args.config) if args.config else default_recipe()
    recipe = override(recipe, args.overrides)
    stages = run_recipe(recipe, args.run_dir or f"runs/{recipe.name}")
    for stage in stages:
        how = "finished before" if stage.skipped else f"{stage.seconds:.0f} s"
        log.info("%s (%s, %s): %s", stage.name, stage.kind, how, stage.model)
    log.info("final model: %s", stages[-1].model)
    return 0


def _count_flag(parser: argparse.ArgumentParser, flag: str, default: int, text: str) -> None:
    """An integer flag whose help states its default."""
    parser.add_argument(flag, type=int, default=default, help=f"{text} (default: {default})")


def _add_eval_flags(parser: argparse.ArgumentParser, defaults: EvalSettings | None = None) -> None:
    """--eval-problems and --eval-k: the held-out evaluation after every stage (`settings.EvalSettings`)."""
    defaults = defaults or EvalSettings()
    _count_flag(parser, "--eval-problems", defaults.problems_per_level, "held-out problems per level")
    _count_flag(parser, "--eval-k", defaults.k, "samples per held-out problem")


def _eval_settings(args) -> EvalSettings:
    return EvalSettings(problems_per_level=args.eval_problems, k=args.eval_k)


def _add_run_parser(sub) -> None:
    run = sub.add_parser(
        "run",
        help="the whole method on the built-in task: data, SFT, RL on easy then hard problems, held-out "
        "evaluation, and an HTML report beside a sequential baseline",
    )
    run.add_argument("--out", help="run folder (default: runs/<timestamp>); an existing one is resumed")
    run.add_argument("--config", help="the parallel recipe (default: configs/tiny.yaml)")
    run.add_argument("--baseline", help="the sequential baseline recipe (default: configs/tiny_sequential.yaml)")
    run.add_argument("--no-baseline", action="store_true", help="train the parallel recipe only")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of both recipes, e.g. --set stages.rl_hard.max_steps=10 (repeatable)",
    )
    run.add_argument(
        "--stages",
        type=int,
        metavar="N",
        help="the first N stages of each recipe only (2: SFT and RL on easy problems, about 8 minutes)",
    )
    _add_eval_flags(run)
    run.add_argument(
        "--model",
        default="tiny",
        help="tiny (default: the whole method from scratch) or a pretrained preset such as smollm2-135m "
        "(a few SFT steps on real cold-start data, then one parallel generation)",
    )
    run.add_argument(
        "--data",
        help="cold-start JSONL for a pretrained --model (rows with question, response, "
        "answer in the parallel format; default: the built-in task's teacher solutions)",
    )
    run.add_argument("--steps", type=int, default=4, help="SFT steps for a pretrained --model")
    run.set_defaults(func=_cmd_run)


def _cmd_run(args) -> int:
    from parallel_r1.pipeline import default_specs, run_pipeline, run_pretrained

    if args.model != "tiny":
        page = run_pretrained(args.model, args.out, data=args.data, steps=args.steps)
        log.info("generation: %s", page)
        return 0
    settings = _eval_settings(args)
    specs = default_specs(args.config, args.baseline, with_baseline=not args.no_baseline)
    result = run_pipeline(args.out, specs, args.overrides, settings, max_stages=args.stages)
    for recipe in result.summary["recipes"]:
        if recipe["rl_gain"] is not None:
            log.info(
                "%s: held-out accuracy %.3f after SFT, %.3f ± %.3f after RL",
                recipe["label"],
                recipe["sft_accuracy"],
                recipe["rl_accuracy"],
                recipe["final_se"] or 0.0,
            )
        vs = recipe.get("vs_baseline")
        if vs:
            log.info(
                "%s minus the baseline: %+.3f ± %.3f over %d held-out problems (%s two standard errors)",
                recipe["label"],
                vs["diff"],
                vs["se"],
                vs["problems"],
                "beyond" if vs["significant"] else "within",
            )
    log.info("report: %s", result.report)
    return 0


def _add_study_parser(sub) -> None:
    study = sub.add_parser(
        "study",
        help="the paper's comparison on the built-in task: sequential GRPO, Seen, Unseen-S1/S2 and the "
        "mid-training scaffold at equal budget, over seeds, with ablations and an HTML report",
    )
    study.add_argument(
        "--out",
        default="runs/study",
        help="study folder (default: runs/study); an existing one is resumed, and the sweep and "
        "the study share its SFT models",
    )
    study.add_argument("--arms", help=f"comma-separated arms (default: {','.join(ARMS)})")
    study.add_argument(
        "--seeds",
        default=",".join(str(s) for s in SEEDS),
        help="comma-separated seeds (each trains its own SFT and RL)",
    )
    study.add_argument(
        "--sweep",
        action="store_true",
        help="instead of the study: each arm's RL learning rate on validation problems (first seed)",
    )
    study.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in SWEEP_LRS), help="learning rates of --sweep")
    study.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of every arm's recipe, e.g. --set stages.rl_hard.max_steps=10",
    )
    _count_flag(study, "--workers", 2, "jobs run side by side, one torch thread each")
    _add_eval_flags(study, study_eval_settings())
    study.set_defaults(func=_cmd_study)


def _csv(text: str, kind, flag: str) -> tuple:
    try:
        return tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated values, got {text!r}") from None


def _cmd_study(args) -> int:
    from parallel_r1.study import run_study, run_sweep

    settings = StudySettings(seeds=_csv(args.seeds, int, "--seeds"), eval=_eval_settings(args), workers=args.workers)
    if args.arms:
        settings = replace(settings, arms=_csv(args.arms, str, "--arms"))
    if args.sweep:
        result = run_sweep(args.out, settings, args.overrides, _csv(args.lrs, float, "--lrs"))
        for arm, lr in result["best_lr"].items():
            log.info("%s: best RL lr %s (validation accuracy %.3f)", arm, lr, result["validation"][arm][lr])
        log.info("table: %s", Path(args.out) / "sweep" / "sweep.md")
        return 0
    report = run_study(args.out, settings, args.overrides)
    log.info("table: %s", Path(args.out) / "study.md")
    log.info("report: %s", report)
    return 0


def _add_generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="sample responses with the parallel rollout engine and show their paths")
    gen.add_argument("--model", required=True, help="model preset (tiny, smollm2-135m), local directory or Hub id")
    gen.add_argument(
        "--prompt", action="append", required=True, help="prompt text, the user turn under a chat template (repeatable)"
    )
    gen.add_argument("--n", type=int, default=1, help="samples per prompt")
    _add_sampling_flags(gen)
    _add_prompt_flags(gen)
    gen.add_argument(
        "--open-block",
        action="store_true",
        help="start each response with an inserted <Parallel> (a model that does not open blocks yet)",
    )
    gen.add_argument("--backend", choices=BACKENDS, default="hf", help="vllm: a model directory or Hub id")
    gen.add_argument("--jsonl", help="also write one JSON record per rollout here")
    gen.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    from parallel_r1.backends import make_engine
    from parallel_r1.files import atomic_write_text
    from parallel_r1.models import load_model_and_tokenizer
    from parallel_r1.prompts import prompt_format
    from parallel_r1.rollout import rollout_record
    from parallel_r1.viewer import render_rollout

    params = SamplingParams(**_sampling_values(args), variant=args.variant, seed=args.seed, open_block=args.open_block)
    if args.backend == "hf":
        model, tokenizer = load_model_and_tokenizer(args.model)
    else:
        model, tokenizer = args.model, None  # vLLM loads its own copy, with the model's tokenizer
    engine = make_engine(args.backend, model, tokenizer)
    fmt = prompt_format(engine.tokenizer, chat_template=args.chat_template, system_prompt=args.system_prompt)
    prompts = [fmt.wrap(p) for p in args.prompt]
    rollouts = engine.generate(prompts, n=args.n, params=params)
    console = Console()
    for rollout in rollouts:
        console.print(render_rollout(rollout))
    if args.jsonl:
        records = [
            rollout_record(r, prompt=prompts[r.prompt_index], token_ids=True, prompt_index=r.prompt_index)
            for r in rollouts
        ]
        atomic_write_text(args.jsonl, "".join(json.dumps(r) + "\n" for r in records))
        log.info("wrote %d rollouts to %s", len(rollouts), args.jsonl)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parallel-r1", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_check_parser,
        _add_eval_parser,
        _add_data_parser,
        _add_view_parser,
        _add_analyze_parser,
        _add_train_parser,
        _add_run_parser,
        _add_study_parser,
        _add_generate_parser,
    ):
        add(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def _is_input_error(exc: BaseException) -> bool:
    if isinstance(exc, INPUT_ERRORS):
        return True
    # An optional package that is not installed; a name of ours that does not import is a bug.
    return isinstance(exc, ModuleNotFoundError) and not (exc.name or "").startswith("parallel_r1")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        if args.debug:
            raise
        if _is_input_error(exc):
            print(f"error: {_one_line(exc)}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(
            f"internal error: a bug in parallel-r1, not in the input ({type(exc).__name__}); please report it "
            "in an issue of the project's repository with the command line and the traceback above",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
