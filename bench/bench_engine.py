"""Wall time of one forked parallel block against three ways of producing the same paths without it.

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
number of tokens. Run: `python bench/bench_engine.py` (tiny model, a few minutes) or
`python bench/bench_engine.py --smollm2 DIR` (SmolLM2-135M in a local HF directory, 512-token prefix).
"""

from __future__ import annotations

import argparse
import time

import torch

from parallel_r1.engine import ParallelEngine, SamplingParams
from parallel_r1.format import TagIds, add_parallel_tokens

NEVER, ALWAYS = -1e4, 1e4


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


def timed(engine: ParallelEngine, prompt: list[int], runs: dict[str, tuple[int, SamplingParams]], repeats: int):
    """Best wall time per named run (n samples, params): one warm-up each, then `repeats` interleaved
    rounds, so that load from other processes hits every variant alike."""
    best = {name: float("inf") for name in runs}
    for round_index in range(repeats + 1):
        for name, (n, params) in runs.items():
            start = time.perf_counter()
            rollouts = engine.generate([prompt], n=n, params=params)
            if round_index:
                best[name] = min(best[name], time.perf_counter() - start)
            assert all(r.finish_reason == "length" for r in rollouts)
    return best


def bench(model, tokenizer, prefix_len: int, path_len: int, paths: list[int], repeats: int) -> None:
    force_lengths(model, tokenizer)
    engine = ParallelEngine(model.eval(), tokenizer)
    generator = torch.Generator().manual_seed(0)
    ordinary = [i for i in range(len(tokenizer)) if i not in set(TagIds.from_tokenizer(tokenizer).as_tuple())]
    prompt = [ordinary[i] for i in torch.randint(len(ordinary), (prefix_len,), generator=generator).tolist()]
    causal = {"seed": 0, "variant": "seen", "max_blocks": 0}
    print(f"prefix {prefix_len} tokens, paths of {path_len} tokens (<Path> and </Path> included)")
    print(
        f"{'N':>3} {'forked s':>9} {'one path s':>11} {'re-encode s':>12} {'sequential s':>13} "
        f"{'forked/one':>11} {'re-enc/forked':>14} {'seq/forked':>11}"
    )
    for n in paths:
        block = SamplingParams(
            seed=0, num_paths=n, max_blocks=1, max_path_tokens=path_len, max_response_tokens=1 + n * path_len
        )
        runs = {
            "forked": (1, block),
            "one": (1, SamplingParams(max_response_tokens=path_len, **causal)),
            "reencode": (n, SamplingParams(max_response_tokens=path_len, **causal)),
            "sequential": (1, SamplingParams(max_response_tokens=n * path_len, **causal)),
        }
        t = timed(engine, prompt, runs, repeats)
        print(
            f"{n:>3} {t['forked']:>9.2f} {t['one']:>11.2f} {t['reencode']:>12.2f} {t['sequential']:>13.2f} "
            f"{t['forked'] / t['one']:>11.2f} {t['reencode'] / t['forked']:>14.2f} "
            f"{t['sequential'] / t['forked']:>11.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", metavar="DIR", help="a local Hugging Face directory of SmolLM2-135M")
    parser.add_argument("--paths", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--prefix", type=int, help="prefix tokens (default: 256 tiny, 512 SmolLM2)")
    parser.add_argument("--path-tokens", type=int, default=128, help="tokens per path, <Path> and </Path> included")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per variant (best is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.smollm2:
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
    bench(model, tokenizer, prefix, args.path_tokens, args.paths, args.repeats)


if __name__ == "__main__":
    main()
