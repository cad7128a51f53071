"""How much of the arithmetic task does the tiny model learn from a few minutes of SFT on 2 cores?

Sizes the embedded default before the trainers exist: cold-start data from the programmatic teacher,
the tiny tokenizer and model, a plain causal-LM loop (AdamW, loss on response tokens only), then greedy
decoding on held-out problems of every level. Prints accuracy and the share of well-formed parallel
outputs per level, training and decoding tokens/s, and the wall-clock time of each phase.

    python bench/learnability.py --hidden 256 --layers 4 --batch-size 16 --lr 2e-3 --steps 1000 \
        --sft-examples 4500 --eval-levels 1,2,3,4 --eval-per-level 25 --eval-every 250

"true equations" (the share of `a op b = c` lines in the outputs that are right) tells arithmetic
slips from a model that has not learned to copy the question's numbers yet.

The CPU may be shared with other work: times and tokens/s are noisy, accuracies are not (fixed seeds).
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import re
import time
from collections import defaultdict

import torch

from parallel_r1 import tasks
from parallel_r1.answers import is_correct
from parallel_r1.data import PROMPT_TEMPLATE, build_prompt
from parallel_r1.format import parse
from parallel_r1.models import load_model_and_tokenizer

log = logging.getLogger("learnability")
EQUATION = re.compile(r"(\d+)([-+*/])(\d+)=(\d+)")
# The short prompt of the trainers' `prompt: question` setting, for tiny models trained from scratch.
TEMPLATES = {"question": "Problem: {question}\n", "parallel": PROMPT_TEMPLATE}


def encode_examples(tokenizer, problems, args) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, response_ids + eos) per problem; prompt and response tokenized separately."""
    rng = random.Random(args.seed)
    out = []
    for p in problems:
        prompt = tokenizer.encode(build_prompt(p.question, TEMPLATES[args.prompt]), add_special_tokens=False)
        response = tokenizer.encode(
            tasks.arith.teacher_solution(p, args.style, rng, args.verify_share), add_special_tokens=False
        )
        out.append((prompt, response + [tokenizer.eos_token_id]))
    return out


def true_equations(text: str) -> tuple[int, int]:
    """(true, all) equations `a op b = c` in `text`: tells arithmetic slips from copying slips."""
    found = EQUATION.findall(text)
    ops = {
        "+": lambda a, b: a + b,
        "-": lambda a, b: a - b,
        "*": lambda a, b: a * b,
        "/": lambda a, b: a / b if b else None,
    }
    return sum(ops[op](int(a), int(b)) == int(c) for a, op, b, c in found), len(found)


def collate(examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on prompt and padding), all (B, T)."""
    width = max(len(p) + len(r) for p, r in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (p, r) in enumerate(examples):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        labels[i, len(p) : n] = torch.tensor(r)
        mask[i, :n] = 1
    return ids, mask, labels


def print_scores(scores: dict, step: int) -> None:
    print(f"after {step} steps; eval decode {scores['seconds']:.0f} s, {scores['tokens_per_s']:.0f} tok/s")
    print("level  accuracy  well-formed parallel  true equations  mean length")
    for level, r in scores["levels"].items():
        eq = r["eq_true"] / max(1, r["eq_all"])
        print(
            f"{level:>5}  {r['correct'] / r['n']:>8.0%}  {r['parallel'] / r['n']:>20.0%}  {eq:>14.0%}  "
            f"{r['length'] / r['n']:>11.0f}"
        )


def train(model, tokenizer, examples, eval_problems, args) -> dict:
    """AdamW with warmup and cosine decay; evaluates every `args.eval_every` steps (0: only at the end)."""
    pad_id = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    rng = random.Random(args.seed)
    order: list[int] = []
    model.train()
    tokens, start, loss_avg, eval_s = 0, time.perf_counter(), None, 0.0
    for step in range(args.steps):
        if len(order) < args.batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        batch = [examples[order.pop()] for _ in range(args.batch_size)]
        ids, mask, labels = collate(batch, pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
        loss_avg = loss.item() if loss_avg is None else 0.9 * loss_avg + 0.1 * loss.item()
        if (step + 1) % args.log_every == 0:
            log.info(
                "step %d loss %.3f (%.0f tok/s)", step + 1, loss_avg, tokens / (time.perf_counter() - start - eval_s)
            )
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            t = time.perf_counter()
            print_scores(evaluate(model, tokenizer, eval_problems, args), step + 1)
            model.train()
            eval_s += time.perf_counter() - t
    seconds = time.perf_counter() - start - eval_s
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "final_loss": loss_avg}


@torch.no_grad()
def evaluate(model, tokenizer, problems, args) -> dict:
    """Greedy decoding, left-padded batches; per-level accuracy and well-formed parallel share."""
    model.eval()
    tokenizer.padding_side = "left"
    results = defaultdict(lambda: {"n": 0, "correct": 0, "parallel": 0, "length": 0, "eq_true": 0, "eq_all": 0})
    shown = set()
    new_tokens, start = 0, time.perf_counter()
    for i in range(0, len(problems), args.eval_batch):
        chunk = problems[i : i + args.eval_batch]
        enc = tokenizer(
            [build_prompt(p.question, TEMPLATES[args.prompt]) for p in chunk], return_tensors="pt", padding=True
        )
        out = model.generate(
            **enc,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for p, row in zip(chunk, out[:, enc["input_ids"].shape[1] :].tolist()):
            row = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
            text = tokenizer.decode(row)
            parsed = parse(text)
            level = int(p.id.split("-")[1][1:])
            r = results[level]
            r["n"] += 1
            r["correct"] += is_correct(text, p.answer)
            r["parallel"] += parsed.has_parallel and parsed.well_formed
            r["length"] += len(row)
            good, seen = true_equations(text)
            r["eq_true"] += good
            r["eq_all"] += seen
            if args.show and level not in shown:
                shown.add(level)
                log.info("level %d, gold %s:\n%s\n%s", level, p.answer, p.question, text)
            new_tokens += len(row)
    seconds = time.perf_counter() - start
    return {"levels": dict(sorted(results.items())), "seconds": seconds, "tokens_per_s": new_tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--sft-examples", type=int, default=4000)
    parser.add_argument("--sft-levels", default="1,2,3")
    parser.add_argument("--eval-levels", default="1,2,3,4,5")
    parser.add_argument("--eval-per-level", type=int, default=50)
    parser.add_argument("--style", choices=("parallel", "sequential"), default="parallel")
    parser.add_argument("--prompt", choices=tuple(TEMPLATES), default="question")
    parser.add_argument("--verify-share", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--show", action="store_true", help="log one decoded output per level")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    kwargs = {"hidden_size": args.hidden, "num_layers": args.layers, "num_heads": args.heads}
    kwargs["intermediate_size"] = 8 * args.hidden // 3 // 16 * 16
    model, tokenizer = load_model_and_tokenizer("tiny", tiny_kwargs=kwargs, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    sft_levels = [int(x) for x in args.sft_levels.split(",")]
    eval_levels = [int(x) for x in args.eval_levels.split(",")]
    sft = tasks.arith.generate(args.sft_examples, sft_levels, "train", args.seed)
    examples = encode_examples(tokenizer, sft, args)
    eval_problems = [p for lv in eval_levels for p in tasks.make_eval_problems(args.eval_per_level, (lv,), args.seed)]
    mean_len = sum(len(p) + len(r) for p, r in examples) / len(examples)
    log.info("model %.2fM params, %d SFT examples (mean %.0f tokens)", n_params / 1e6, len(examples), mean_len)

    fit = train(model, tokenizer, examples, eval_problems, args)
    scores = evaluate(model, tokenizer, eval_problems, args)

    print(f"\nmodel: hidden {args.hidden}, layers {args.layers}, {n_params / 1e6:.2f}M params; style {args.style}")
    print(
        f"SFT: {args.sft_examples} examples of levels {sft_levels} (mean {mean_len:.0f} tokens), "
        f"{args.steps} steps x {args.batch_size}, lr {args.lr}"
    )
    print(f"train: {fit['seconds']:.0f} s, {fit['tokens_per_s']:.0f} tok/s, final loss {fit['final_loss']:.3f}")
    print_scores(scores, args.steps)


if __name__ == "__main__":
    main()
