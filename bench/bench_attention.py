"""Cost of the structured (Unseen) attention against the plain causal forward, on the tiny model.

For B=8 and T in (1024, 4096) it times, in the same run:
  * building the dense additive mask and positions (`build_attention`),
  * the plain causal forward `model(input_ids)` (the baseline),
  * the structured forward: mask + positions + `model(..., attention_mask=4-D mask, position_ids=...)`,
and prints the ratios. Rows hold three blocks of two paths each, left-padded to T.

    python bench/bench_attention.py [--lengths 1024 4096] [--batch 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from parallel_r1.attention import build_attention
from parallel_r1.format import TagIds
from parallel_r1.tiny import build_model, build_tokenizer

CORPUS = ["<Parallel><Path>3 + 4 = 7</Path><Path>4 + 3 = 7</Path></Parallel><Summary>7</Summary>"] * 4


def structured_batch(tags: TagIds, batch: int, length: int, vocab: int, seed: int = 0):
    """(input_ids, attention_mask) [B, T]: text, then three blocks of two paths, row lengths T/2..T."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        n = length - b * length // (2 * batch)
        row = torch.randint(20, vocab, (n,), generator=g)
        for k in range(3):
            at = n // 8 + k * n // 4
            path = n // 12
            row[at] = tags.parallel_open
            row[at + 1] = tags.path_open
            row[at + path] = tags.path_close
            row[at + path + 1] = tags.path_open
            row[at + 2 * path] = tags.path_close
            row[at + 2 * path + 1] = tags.parallel_close
            row[at + 2 * path + 2] = tags.summary_open
        ids[b, length - n :], mask[b, length - n :] = row, 1
    return ids, mask


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)

    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    tags = TagIds.from_tokenizer(tokenizer)
    model = build_model(tokenizer, max_positions=max(args.lengths)).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"tiny Llama {params:.1f} M params, sdpa, fp32, {torch.get_num_threads()} threads, batch {args.batch}")
    header = ("T", "mask ms", "causal ms", "struct ms", "struct/causal", "mask/causal", "mask MiB")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (6, 9, 10, 10, 14, 12, 9))))
    for length in args.lengths:
        ids, mask = structured_batch(tags, args.batch, length, len(tokenizer))
        with torch.inference_mode():
            t_mask = best_time(lambda: build_attention(ids, mask, tags), args.repeats)
            t_causal = best_time(lambda: model(input_ids=ids, attention_mask=mask), args.repeats)

            def structured():
                add, pos = build_attention(ids, mask, tags)
                model(input_ids=ids, attention_mask=add, position_ids=pos)

            t_struct = best_time(structured, args.repeats)
        mib = args.batch * length * length * 4 / 2**20
        print(
            f"{length:>6} {t_mask * 1e3:>9.0f} {t_causal * 1e3:>10.0f} {t_struct * 1e3:>10.0f} "
            f"{t_struct / t_causal:>14.2f} {t_mask / t_causal:>12.2f} {mib:>9.0f}"
        )


if __name__ == "__main__":
    main()
