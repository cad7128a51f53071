"""The `parallel-r1` command line. Each sub-command is a thin wrapper over a module's public API."""

from __future__ import annotations

import argparse
import logging
import sys


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parallel-r1", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="strictly validate the parallel format of the responses in a JSONL file")
    check.add_argument("file", help="JSONL file, one record a line")
    check.add_argument("--field", default="response", help="record field holding the response (default: response)")
    check.add_argument("--json", action="store_true", help="print one JSON object per record")
    check.set_defaults(func=_cmd_check)

    ev = sub.add_parser("eval", help="sample k responses per benchmark problem and report mean@k, pass@k, maj@k")
    ev.add_argument(
        "--model", nargs="+", required=True, help="model preset, local directory or Hub id (several: one table)"
    )
    ev.add_argument("--benchmarks", default="aime24,aime25,amc23,math500,gsm8k",
                    help="comma-separated names (aime24, aime25, amc23, math500, gsm8k) or name=path.jsonl")
    ev.add_argument("--k", type=int, default=16, help="samples per problem")
    ev.add_argument("--data-dir", help="read benchmarks from local files here (aime24.jsonl, gsm8k_test.jsonl, ...)")
    ev.add_argument("--limit", type=int, help="first N problems of each benchmark")
    ev.add_argument("--variant", choices=("unseen", "seen"), default="unseen", help="decoding variant")
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--top-p", type=float, default=1.0)
    ev.add_argument("--max-response-tokens", type=int, default=3000)
    ev.add_argument("--max-path-tokens", type=int, default=1024)
    ev.add_argument("--num-paths", type=int, default=2)
    ev.add_argument("--batch-size", type=int, default=64, help="rollouts decoded together")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--template", default="parallel",
                    help="prompt: 'parallel' (asks for blocks), 'sequential', or a text file with {question}")
    ev.add_argument("--out", help="write results (JSON) here, and the samples next to it (.samples.jsonl)")
    ev.set_defaults(func=_cmd_eval)

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
    gen.add_argument("--retries", type=int, default=3, help="retries on timeouts, 429 and 5xx")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--max-tokens", type=int, default=4096)
    gen.set_defaults(func=_cmd_data_generate)

    view = sub.add_parser("view", help="write a self-contained HTML page to read rollouts")
    view.add_argument("inputs", nargs="+", help="rollout JSONL files, run directories or eval result JSON")
    view.add_argument("--out", default="rollouts.html")
    view.add_argument("--limit", type=int, default=2000, help="at most this many samples on the page")
    view.set_defaults(func=_cmd_view)

    analyze = sub.add_parser("analyze", help="strategy evolution: where blocks appear, their role, path agreement")
    analyze.add_argument("inputs", nargs="+", help="rollout JSONL files, run directories or eval result JSON")
    analyze.add_argument("--out", default="analysis", help="directory for summary.json and strategy.png")
    analyze.set_defaults(func=_cmd_analyze)

    train = sub.add_parser("train", help="run a training recipe (SFT and GRPO stages); resumes a killed run")
    train.add_argument("--config", help="recipe YAML (default: the embedded tiny recipe, configs/tiny.yaml)")
    train.add_argument("--run-dir", help="output folder (default: runs/<recipe name>); an existing one is resumed")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe field, e.g. --set stages.0.lr=1e-5 (repeatable)")
    train.set_defaults(func=_cmd_train)

    run = sub.add_parser(
        "run",
        help="the whole method on the built-in task: data, SFT, RL on easy then hard problems, held-out "
        "evaluation, and an HTML report beside a sequential baseline",
    )
    run.add_argument("--out", help="run folder (default: runs/<timestamp>); an existing one is resumed")
    run.add_argument("--config", help="the parallel recipe (default: configs/tiny.yaml)")
    run.add_argument("--baseline", help="the sequential baseline recipe (default: configs/tiny_sequential.yaml)")
    run.add_argument("--no-baseline", action="store_true", help="train the parallel recipe only")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a field of both recipes, e.g. --set stages.rl_hard.max_steps=10 (repeatable)")
    run.add_argument("--stages", type=int, metavar="N",
                     help="the first N stages of each recipe only (2: SFT and RL on easy problems, about 8 minutes)")
    run.add_argument("--eval-problems", type=int, help="held-out problems per level (default: 64)")
    run.add_argument("--eval-k", type=int, help="samples per held-out problem (default: 4)")
    run.add_argument("--model", default="tiny",
                     help="tiny (default: the whole method from scratch) or a pretrained preset such as smollm2-135m "
                     "(a few SFT steps on real cold-start data, then one parallel generation)")
    run.add_argument("--data", help="cold-start JSONL for a pretrained --model (default: "
                     "../shared/data/parallel_gsm8k_sample.jsonl when present)")
    run.add_argument("--steps", type=int, default=4, help="SFT steps for a pretrained --model")
    run.set_defaults(func=_cmd_run)

    gen = sub.add_parser("generate", help="sample responses with the parallel rollout engine and show their paths")
    gen.add_argument("--model", required=True, help="model preset (tiny, smollm2-135m), local directory or Hub id")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    gen.add_argument("--n", type=int, default=1, help="samples per prompt")
    gen.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--variant", choices=("unseen", "seen"), default="unseen")
    gen.add_argument("--num-paths", type=int, default=2, help="paths forked per block (unseen)")
    gen.add_argument("--max-tokens", type=int, default=512, help="response cap, every path's tokens included")
    gen.add_argument("--max-path-tokens", type=int, default=128)
    gen.add_argument("--max-blocks", type=int, default=4)
    gen.add_argument("--open-block", action="store_true",
                     help="start each response with an inserted <Parallel> (a model that does not open blocks yet)")
    gen.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    gen.add_argument("--jsonl", help="also write one JSON record per rollout here")
    gen.set_defaults(func=_cmd_generate)

    return parser


def _cmd_generate(args) -> int:
    import json

    from rich.console import Console

    from parallel_r1.engine import ParallelEngine, SamplingParams, render_rollout, rollout_record
    from parallel_r1.models import load_model_and_tokenizer

    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        max_response_tokens=args.max_tokens, max_path_tokens=args.max_path_tokens, max_blocks=args.max_blocks,
        num_paths=args.num_paths, variant=args.variant, open_block=args.open_block,
    )  # fmt: skip
    if args.backend == "vllm":
        from transformers import AutoTokenizer

        model, tokenizer = args.model, AutoTokenizer.from_pretrained(args.model)
    else:
        model, tokenizer = load_model_and_tokenizer(args.model)
    rollouts = ParallelEngine(model, tokenizer, backend=args.backend).generate(args.prompt, n=args.n, params=params)
    console = Console()
    for rollout in rollouts:
        console.print(render_rollout(rollout))
    if args.jsonl:
        with open(args.jsonl, "w", encoding="utf-8") as f:
            for rollout in rollouts:
                f.write(json.dumps(rollout_record(rollout, args.prompt[rollout.prompt_index])) + "\n")
        logging.getLogger(__name__).info("wrote %d rollouts to %s", len(rollouts), args.jsonl)
    return 0


def _cmd_check(args) -> int:
    import json

    from parallel_r1.format import InputError, check_file, check_report

    try:
        results = check_file(args.file, args.field)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        for result in results:
            print(json.dumps(result))
    else:
        print(check_report(args.file, results))
    return 0 if all(r["valid"] for r in results) else 1


def _cmd_eval(args) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.markdown import Markdown

    from parallel_r1.data import PROMPT_TEMPLATE, SEQUENTIAL_TEMPLATE
    from parallel_r1.evaluate import EvalConfig, markdown_table, run_eval

    templates = {"parallel": PROMPT_TEMPLATE, "sequential": SEQUENTIAL_TEMPLATE}
    template = templates.get(args.template) or Path(args.template).read_text(encoding="utf-8")
    cfg = EvalConfig(
        template=template,
        k=args.k,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        max_response_tokens=args.max_response_tokens,
        max_path_tokens=args.max_path_tokens,
        num_paths=args.num_paths,
        variant=args.variant,
        max_batch_size=args.batch_size,
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


def _cmd_data_generate(args) -> int:
    from parallel_r1.coldstart import TeacherConfig, run_generate

    cfg = TeacherConfig(
        url=args.teacher_url,
        model=args.model,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        timeout_s=args.timeout,
        retries=args.retries,
        concurrency=args.concurrency,
    )
    report = run_generate(cfg, args.dataset, args.out, limit=args.limit, split=args.split)
    logging.getLogger(__name__).info("%s: %s", args.out, report.describe())
    return 0


def _cmd_view(args) -> int:
    from parallel_r1.viewer import write_viewer

    path = write_viewer(args.inputs, args.out, limit=args.limit)
    logging.getLogger(__name__).info("wrote %s", path)
    return 0


def _cmd_analyze(args) -> int:
    from parallel_r1.analysis import run_analysis

    summaries = run_analysis(args.inputs, args.out)
    log = logging.getLogger(__name__)
    log.info("%d groups analysed; wrote %s/summary.json and strategy.png", len(summaries), args.out)
    return 0


def _cmd_train(args) -> int:
    from parallel_r1.config import ConfigError, default_recipe, load_recipe, override
    from parallel_r1.recipe import run_recipe

    try:
        recipe = load_recipe(args.config) if args.config else default_recipe()
        recipe = override(recipe, args.overrides)
    except ConfigError as exc:
        logging.getLogger("parallel_r1").error("%s", exc)
        return 2
    final = run_recipe(recipe, args.run_dir or f"runs/{recipe.name}")
    logging.getLogger("parallel_r1").info("final model: %s", final)
    return 0


def _cmd_run(args) -> int:
    from dataclasses import replace

    from parallel_r1.config import ConfigError
    from parallel_r1.pipeline import EvalSettings, default_specs, run_pipeline, run_pretrained

    logger = logging.getLogger("parallel_r1")
    try:
        if args.model != "tiny":
            page = run_pretrained(args.model, args.out, data=args.data, steps=args.steps)
            logger.info("generation: %s", page)
            return 0
        settings = EvalSettings()
        if args.eval_problems:
            settings = replace(settings, problems_per_level=args.eval_problems)
        if args.eval_k:
            settings = replace(settings, k=args.eval_k)
        specs = default_specs(args.config, args.baseline, with_baseline=not args.no_baseline)
        result = run_pipeline(args.out, specs, args.overrides, settings, max_stages=args.stages)
    except (ConfigError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    for recipe in result.summary["recipes"]:
        if recipe["rl_gain"] is not None:
            logger.info(
                "%s: held-out accuracy %.3f after SFT, %.3f after RL", recipe["label"], recipe["sft_accuracy"], recipe["rl_accuracy"]
            )
    logger.info("report: %s", result.report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
