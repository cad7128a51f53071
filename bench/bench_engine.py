"""Wall time of one forked parallel block against three ways of producing the same paths without it,
and of the engine's plain sequential decoding against `model.generate`.

For N = 2, 4, 8 paths of P tokens after a prefix of L tokens (tiny model: L = 256, P = 128):

* forked: the engine's Unseen block -- the prefix is encoded once, its KV cache is shared by the N paths,
  which decode together in one forward pass per step;
* one path: a single path of P tokens after the prefix (the floor: what one path costs);
* re-encode: N rows that each encode the prefix and decode P tokens, batched (the reference engine's
  one-request-per-path, without a prefix cache);
* sequential: one row that decodes the N * P tokens one path after another (a causal model writing the
  same amount of text).

Every variant runs through the same `ParallelEngine` decode loop, so the ratios measure the algorithm,
not two implementations. `</Path>` and EOS are banned by an output bias (and `<Parallel>` is forced as
the first response token), so every path is exactly P tokens long and every variant decodes the same
number of tokens. `--vs-generate` times plain sampling of P tokens (batch 1 and `--batch`) by the engine
(Seen, no blocks) and by `model.generate` (same temperature, tags suppressed). `--profile` prints where
the engine's time went (`ParallelEngine.stats`: phases of the decode loop, batch utilisation).

Runs (each a few minutes on 2 CPU cores; run them on an idle machine, the ratios are from one run):

    python bench/bench_engine.py                                  # tiny model
    python bench/bench_engine.py --smollm2 --paths 4 8 --runs forked one
    python bench/bench_engine.py --smollm2 --prefix 2000 --paths 2 --runs forked reencode
    python bench/bench_engine.py --smollm2 --vs-generate

`--smollm2` loads the `smollm2-135m` preset (`--smollm2 DIR`: a local Hugging Face directory of it).
"""

from __future__ import annotations

import argparse
import time

import torch

from parallel_r1.engine import PHASES, ParallelEngine, SamplingParams
from parallel_r1.format import TagIds, add_parallel_tokens

NEVER, ALWAYS = -1e4, 1e4
clock = time.perf_counter  # --cpu-time: time.process_time (steadier on a shared machine, 1 thread only)
RUNS = ("forked", "one", "reencode", "sequential")


def force_lengths(model, tokenizer) -> None:
    """Give the output layer a bias: `<Parallel>` always wins where allowed, `</Path>` and EOS never do."""
    tags = TagIds.from_tokenizer(tokenizer)
    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.weight.shape[1], old.weight.shape[0], bias=True, dtype=old.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[[tags.path_close, tokenizer.eos_token_id]] = NEVER
        head.bias[tags.parallel_open] = ALWAYS
    model.set_output_embeddings(head)


def profile_line(engine: ParallelEngine, name: str) -> str:
    stats = engine.stats
    total = sum(stats.seconds.values()) or 1.0
    shares = " ".join(f"{phase} {stats.seconds[phase] / total:5.1%}" for phase in PHASES)
    return f"  {name:<10} {stats.forwards:>5} forwards, utilisation {stats.utilisation:.2f}: {shares}"


def timed(
    engine: ParallelEngine,
    prompt: list[int],
    runs: dict[str, tuple[int, SamplingParams]],
    repeats: int,
    profile: bool = False,
):
    """Best wall time per named run (n samples, params): a short warm-up, then `repeats` interleaved
    rounds, so that load from other processes hits every variant alike."""
    best = {name: float("inf") for name in runs}
    lines = {}
    engine.generate([prompt], params=SamplingParams(seed=0, variant="seen", max_blocks=0, max_response_tokens=4))
    for _ in range(repeats):
        for name, (n, params) in runs.items():
            engine.reset_stats()
            start = clock()
            rollouts = engine.generate([prompt], n=n, params=params)
            best[name] = min(best[name], clock() - start)
            assert all(r.finish_reason == "length" for r in rollouts)
            lines[name] = profile_line(engine, name)
    if profile:
        print("\n".join(lines.values()))
    return best


def bench(model, tokenizer, prefix_len: int, path_len: int, paths: list[int], repeats: int, runs, profile) -> None:
    engine = ParallelEngine(model.eval(), tokenizer)
    prompt = random_prompt(tokenizer, prefix_len)
    causal = {"seed": 0, "variant": "seen", "max_blocks": 0}
    print(f"prefix {prefix_len} tokens, paths of {path_len} tokens (<Path> and </Path> included)")
    names = {"forked": "forked s", "one": "one path s", "reencode": "re-encode s", "sequential": "sequential s"}
    ratios = {
        "forked/one": ("forked", "one"),
        "re-enc/forked": ("reencode", "forked"),
        "seq/forked": ("sequential", "forked"),
    }
    ratios = {k: v for k, v in ratios.items() if v[0] in runs and v[1] in runs}
    print(f"{'N':>3} " + " ".join(f"{names[r]:>13}" for r in runs) + " " + " ".join(f"{k:>14}" for k in ratios))
    for n in paths:
        block = SamplingParams(
            seed=0, num_paths=n, max_blocks=1, max_path_tokens=path_len, max_response_tokens=1 + n * path_len
        )
        every = {
            "forked": (1, block),
            "one": (1, SamplingParams(max_response_tokens=path_len, **causal)),
            "reencode": (n, SamplingParams(max_response_tokens=path_len, **causal)),
            "sequential": (1, SamplingParams(max_response_tokens=n * path_len, **causal)),
        }
        t = timed(engine, prompt, {r: every[r] for r in runs}, repeats, profile)
        print(
            f"{n:>3} "
            + " ".join(f"{t[r]:>13.2f}" for r in runs)
            + " "
            + " ".join(f"{t[a] / t[b]:>14.2f}" for a, b in ratios.values())
        )


def random_prompt(tokenizer, length: int) -> list[int]:
    generator = torch.Generator().manual_seed(0)
    ordinary = [i for i in range(len(tokenizer)) if i not in set(TagIds.from_tokenizer(tokenizer).as_tuple())]
    return [ordinary[i] for i in torch.randint(len(ordinary), (length,), generator=generator).tolist()]


def vs_generate(model, tokenizer, prefix_len: int, tokens: int, batches: list[int], repeats: int, profile) -> None:
    """Plain sampling of `tokens` tokens: the engine (Seen, no blocks) against `model.generate`."""
    engine = ParallelEngine(model.eval(), tokenizer, max_batch_size=max(batches))
    prompt = random_prompt(tokenizer, prefix_len)
    tags = list(TagIds.from_tokenizer(tokenizer).as_tuple())
    params = SamplingParams(seed=0, variant="seen", max_blocks=0, max_response_tokens=tokens)
    print(f"\nplain sampling of {tokens} tokens after a {prefix_len}-token prompt (temperature 1)")
    print(f"{'batch':>5} {'engine s':>9} {'generate s':>11} {'generate/engine':>16}")
    for batch in batches:
        ids = torch.tensor([prompt] * batch)

        def hf():
            with torch.inference_mode():
                out = model.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                    max_new_tokens=tokens, min_new_tokens=tokens, suppress_tokens=tags, pad_token_id=0,
                )  # fmt: skip
            assert out.shape[1] == ids.shape[1] + tokens

        best = {"engine": float("inf"), "generate": float("inf")}
        hf()  # warm-up
        engine.generate([prompt], params=SamplingParams(seed=0, variant="seen", max_blocks=0, max_response_tokens=4))
        for _ in range(repeats):
            engine.reset_stats()
            start = clock()
            engine.generate([prompt], n=batch, params=params)
            best["engine"] = min(best["engine"], clock() - start)
            start = clock()
            hf()
            best["generate"] = min(best["generate"], clock() - start)
        print(f"{batch:>5} {best['engine']:>9.2f} {best['generate']:>11.2f} {best['generate'] / best['engine']:>16.2f}")
        if profile:
            print(profile_line(engine, "engine"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--smollm2", nargs="?", const="preset", metavar="DIR", help="SmolLM2-135M: the preset, or a local HF directory"
    )
    parser.add_argument("--paths", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--prefix", type=int, help="prefix tokens (default: 256 tiny, 512 SmolLM2)")
    parser.add_argument("--path-tokens", type=int, default=128, help="tokens per path, <Path> and </Path> included")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS), help="which variants to time")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per variant (best is kept)")
    parser.add_argument("--vs-generate", action="store_true", help="only: engine vs model.generate, plain text")
    parser.add_argument("--batch", type=int, default=8, help="the larger batch of --vs-generate")
    parser.add_argument("--profile", action="store_true", help="print the engine's phase shares per run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)")
    parser.add_argument("--cpu-time", action="store_true", help="time CPU seconds of this process, not wall time")
    args = parser.parse_args()
    global clock
    clock = time.process_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    if args.smollm2 == "preset":
        from parallel_r1.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer("smollm2-135m")
        prefix = args.prefix or 512
    elif args.smollm2:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.smollm2)
        model = AutoModelForCausalLM.from_pretrained(args.smollm2, dtype=torch.float32, attn_implementation="sdpa")
        add_parallel_tokens(tokenizer, model)
        prefix = args.prefix or 512
    else:
        from parallel_r1.tiny import build_model, build_tokenizer

        corpus = [f"Question: {a} + {b} = {a + b}. Both paths agree.\n" for a in range(40) for b in range(10)]
        tokenizer = build_tokenizer(corpus, vocab_size=512)
        model = build_model(tokenizer)
        prefix = args.prefix or 256
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {args.threads} threads")
    force_lengths(model, tokenizer)
    if args.vs_generate:
        vs_generate(model, tokenizer, prefix, args.path_tokens, [1, args.batch], args.repeats, args.profile)
    else:
        runs = [r for r in RUNS if r in args.runs]
        bench(model, tokenizer, prefix, args.path_tokens, args.paths, args.repeats, runs, args.profile)


if __name__ == "__main__":
    main()
