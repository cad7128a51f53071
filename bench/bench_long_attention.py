"""Peak memory and time of a training log-prob forward + backward at long T: causal vs dense mask vs chunked.

For each T (default 2048, 8192, 16384) and each case it runs, in a fresh subprocess:
  * causal:  `model(input_ids)` with sdpa's is_causal kernel (the baseline), then `token_logprobs`,
  * dense:   `response_logprobs(..., kernel="dense")`, the structured `[B, 1, S, S]` mask with sdpa,
  * chunked: `response_logprobs(..., kernel="chunked")`, `parallel_r1.chunked_attention` (no S x S tensor),
then `logprobs.sum().backward()`. Rows: B = 1, a prompt, two `<Parallel>` blocks of two paths each
(paths are half of the tokens), text after each summary. Model: the tiny Llama of `parallel_r1.tiny`
(hidden 256, 4 layers, 4 heads of 64, vocabulary 300), fp32.

Memory: each case runs in its own process; the figure is the process's peak resident set
(`ru_maxrss`) minus its resident set just before the measured forward (after the model, the inputs
and a small warm-up pass exist), i.e. the extra memory the forward + backward needed at its peak.
Time: wall clock of that one forward + backward (mask / layout building included). Ratios are
against the causal case of the same run; run it on an idle machine for meaningful numbers:

    OMP_NUM_THREADS=1 python bench/bench_long_attention.py [--lengths 2048 8192 16384] [--threads 1]
        [--variant unseen|seen|threads] [--cases causal dense chunked]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CORPUS = ["<Parallel><Path>3 + 4 = 7</Path><Path>4 + 3 = 7</Path></Parallel><Summary>7</Summary>"] * 4


def structured_row(tags, length: int, vocab: int, seed: int = 0):
    """input_ids [1, length]: prompt T/8, then two blocks whose two paths are T/8 each, text between."""
    import torch

    g = torch.Generator().manual_seed(seed)
    row = torch.randint(20, vocab, (length,), generator=g)
    path = length // 8
    for at in (length // 8, length // 2 + length // 16):
        row[at] = tags.parallel_open
        row[at + 1] = tags.path_open
        row[at + path] = tags.path_close
        row[at + path + 1] = tags.path_open
        row[at + 2 * path] = tags.path_close
        row[at + 2 * path + 1] = tags.parallel_close
        row[at + 2 * path + 2] = tags.summary_open
    return row[None]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_case(case: str, length: int, variant: str, threads: int) -> dict:
    """One forward + backward in this process: {"seconds", "peak_mib", "base_mib"}."""
    import torch

    from parallel_r1.attention import response_logprobs, token_logprobs
    from parallel_r1.format import TagIds
    from parallel_r1.tiny import build_model, build_tokenizer

    torch.set_num_threads(threads)
    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    tags = TagIds.from_tokenizer(tokenizer)
    model = build_model(tokenizer, max_positions=2 * length).train()

    def step(ids):
        if case == "causal":
            logp, _ = token_logprobs(model(input_ids=ids, use_cache=False).logits, ids)
        else:
            logp, _ = response_logprobs(model, ids, torch.ones_like(ids), tags, variant, kernel=case)
        logp.sum().backward()
        model.zero_grad(set_to_none=False)

    step(structured_row(tags, 256, len(tokenizer), seed=1))  # warm-up: kernels, allocator, grad buffers
    ids = structured_row(tags, length, len(tokenizer))
    base = _rss_mib()
    start = time.perf_counter()
    step(ids)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_mib": peak - base, "base_mib": base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--cases", nargs="+", default=["causal", "dense", "chunked"])
    parser.add_argument("--variant", default="unseen", choices=["unseen", "seen", "threads"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", nargs=2, metavar=("CASE", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one[0], int(args.one[1]), args.variant, args.threads)))
        return

    print(f"tiny Llama (hidden 256, 4 layers), fp32, B=1, variant {args.variant}, {args.threads} thread(s)")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    header = ("T", "case", "seconds", "peak MiB", "time/causal", "mem/causal")
    print(" ".join(f"{h:>12}" for h in header))
    for length in args.lengths:
        causal = None
        for case in args.cases:
            cmd = [sys.executable, __file__, "--one", case, str(length), "--variant", args.variant]
            cmd += ["--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{length:>12} {case:>12} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            res = json.loads(done.stdout.strip().splitlines()[-1])
            if case == "causal":
                causal = res
            ratios = ("", "")
            if causal is not None:
                ratios = (
                    f"{res['seconds'] / causal['seconds']:.2f}",
                    f"{res['peak_mib'] / causal['peak_mib']:.2f}",
                )
            print(
                f"{length:>12} {case:>12} {res['seconds']:>12.2f} {res['peak_mib']:>12.0f} "
                f"{ratios[0]:>12} {ratios[1]:>12}",
                flush=True,
            )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
