import pytest
import torch

from parallel_r1.config import parse_recipe
from parallel_r1.files import read_jsonl
from parallel_r1.format import TagIds, canonicalize
from parallel_r1.sft import Example, SFTTrainer, collate, encode_record, epoch_batches, response_nll_sum


def test_encode_record_tokenizes_prompt_then_canonical_response_and_eos(tiny_tokenizer):
    response = (
        "3 + 4 = 7\n<Parallel>\n<Path>3 + 4 = 7</Path>\n<Path>4 + 3 = 7</Path>\n</Parallel>\n<Summary>7</Summary>"
    )
    example = encode_record(tiny_tokenizer, "Question: Tom has 3 apples.\n", response, max_length=512)
    prompt_ids = tiny_tokenizer("Question: Tom has 3 apples.\n")["input_ids"]
    response_ids = tiny_tokenizer(canonicalize(response), add_special_tokens=False)["input_ids"]
    assert canonicalize(response) != response
    assert example.input_ids == prompt_ids + response_ids + [tiny_tokenizer.eos_token_id]
    assert example.prompt_len == len(prompt_ids)
    short = encode_record(tiny_tokenizer, "Question: Tom has 3 apples.\n", response, max_length=5)
    assert len(short.input_ids) == 5 and short.prompt_len == 5


def test_collate_left_pads_and_masks_only_response_tokens():
    ids, attn, loss = collate([Example([1, 2, 3, 4, 5], 3), Example([6, 7, 8], 1)], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 4, 5], [0, 0, 6, 7, 8]]
    assert attn.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert loss.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]


def _batch(tiny_tokenizer):
    examples = [
        encode_record(tiny_tokenizer, "Question: Tom has 3 apples.\n", "3 + 4 = 7\nFinal Answer: 7", 256),
        encode_record(
            tiny_tokenizer,
            "Amy reads 12 pages.\n",
            "<Parallel><Path>12</Path><Path>12</Path></Parallel><Summary>12</Summary>",
            256,
        ),
    ]
    return examples, collate(examples, tiny_tokenizer.pad_token_id)


def test_loss_is_the_response_token_nll_and_prompt_predictions_get_no_gradient(tiny_model, tiny_tokenizer):
    tags = TagIds.from_tokenizer(tiny_tokenizer)
    examples, (ids, attn, loss_mask) = _batch(tiny_tokenizer)
    captured = {}

    def keep_logits(module, inputs, output):
        output.retain_grad()
        captured["logits"] = output

    handle = tiny_model.lm_head.register_forward_hook(keep_logits)
    nll = response_nll_sum(tiny_model, ids, attn, loss_mask, tags, "seen")
    nll.backward()
    handle.remove()
    logits = captured["logits"]

    # The same number by hand: -log softmax(logits[t-1])[ids[t]] summed over response tokens only.
    logp = torch.log_softmax(logits.detach()[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    assert torch.allclose(nll.detach(), -(logp * loss_mask[:, 1:]).sum(), atol=1e-4)
    # Logits that predict a prompt token (or padding) get exactly zero gradient; response ones do not.
    grad_norm_per_position = logits.grad.abs().sum(-1)
    predicts_response = torch.zeros_like(loss_mask, dtype=torch.bool)
    predicts_response[:, :-1] = loss_mask[:, 1:].bool()
    assert (grad_norm_per_position[~predicts_response] == 0).all()
    assert (grad_norm_per_position[predicts_response] > 0).all()


def test_changing_prompt_labels_does_not_change_the_loss(tiny_model, tiny_tokenizer):
    """Per-token log-probs at prompt positions are replaced by garbage: the masked loss is unchanged."""
    from parallel_r1 import sft

    tags = TagIds.from_tokenizer(tiny_tokenizer)
    _, (ids, attn, loss_mask) = _batch(tiny_tokenizer)
    base = response_nll_sum(tiny_model, ids, attn, loss_mask, tags, "seen")
    real = sft.response_logprobs

    def noisy(*args, **kwargs):
        logp, ent = real(*args, **kwargs)
        return torch.where(loss_mask.bool(), logp, torch.full_like(logp, -123.0)), ent

    sft.response_logprobs = noisy
    try:
        noisy_loss = response_nll_sum(tiny_model, ids, attn, loss_mask, tags, "seen")
    finally:
        sft.response_logprobs = real
    assert torch.equal(base, noisy_loss)


def test_epoch_batches_visit_every_record_once_and_bucket_by_length():
    lengths = [(i * 37) % 100 + 1 for i in range(103)]
    batches = epoch_batches(lengths, batch_size=8, bucket_batches=4, seed=1, epoch=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(103))
    assert batches == epoch_batches(lengths, 8, 4, seed=1, epoch=0)
    assert batches != epoch_batches(lengths, 8, 4, seed=1, epoch=1)
    unbucketed = epoch_batches(lengths, 8, 1, seed=1, epoch=0)
    padding = lambda bs: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)  # noqa: E731
    assert padding(batches) < padding(unbucketed) / 2


TINY_SFT = """
name: sft-test
stages:
  - name: sft
    kind: sft
    variant: {variant}
    model: {{name_or_path: tiny, tiny: {{hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 128}}}}
    data: {{source: task, task_size: 24, eval_size: 8, prompt: question}}
    lr: 1.0e-2
    sft: {{batch_size: 8, grad_accum: 2, epochs: 8}}
"""


def test_sft_on_a_few_examples_drives_the_loss_down(tmp_path):
    recipe = parse_recipe(TINY_SFT.format(variant="unseen"))
    trainer = SFTTrainer(recipe.stages[0], tmp_path / "sft", init_model="tiny", seed=0)
    assert trainer.total_steps == 8  # 16 training records, 2 batches of 8 per step, 8 epochs
    trainer.train()
    rows = read_jsonl(tmp_path / "sft" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    assert rows[-1]["eval_loss"] < rows[0]["loss"]
    # The step consumes 2 batches of 8 records: every epoch sees each training record once.
    for r in rows:
        assert sorted(r["data_indices"]) == list(range(16))


def test_task_style_picks_the_teachers_solutions_on_the_same_problems():
    from parallel_r1.format import parse
    from parallel_r1.sft import load_records

    text = TINY_SFT.format(variant="seen")
    styles = ("parallel", "sequential")
    stages = {s: parse_recipe(text.replace("prompt: question", f"task_style: {s}")).stages[0] for s in styles}
    parallel, sequential = (load_records(stages[style], seed=3) for style in ("parallel", "sequential"))
    assert [r.prompt for r in parallel] == [r.prompt for r in sequential] and len(parallel) == 24
    assert all(parse(r.response).num_blocks == 1 for r in parallel)
    assert all(parse(r.response).num_blocks == 0 and "<" not in r.response for r in sequential)
    assert [r.answer for r in parallel] == [r.answer for r in sequential]


def test_a_max_length_that_cuts_every_response_away_is_refused(tmp_path):
    stage = parse_recipe(TINY_SFT.format(variant="seen").replace("epochs: 8", "epochs: 1, max_length: 12")).stages[0]
    with pytest.raises(ValueError, match="sft.max_length 12 leaves no response token in any record"):
        SFTTrainer(stage, tmp_path / "sft", init_model="tiny", seed=0)


# ---- under a chat template ----

CHAT_RESPONSE = (
    "3 + 4 = 7\n<Parallel>\n<Path>3 + 4</Path>\n<Path>4 + 3</Path>\n</Parallel>\n<Summary>7</Summary>\nFinal Answer: 7"
)


def _conversation_ids(tokenizer, instruction: str, response: str | None = None) -> list[int]:
    messages = [{"role": "user", "content": instruction.strip()}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=response is None, return_dict=True)
    return encoded["input_ids"]


def _check_masks_exactly_the_template(tokenizer, example: Example, instruction: str) -> None:
    """The example is the template's rendering of the conversation up to the end of the assistant's turn, and
    the loss falls on the assistant's tokens and its end-of-turn token only."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = _conversation_ids(tokenizer, instruction)
    full = _conversation_ids(tokenizer, instruction, canonicalize(CHAT_RESPONSE))
    ids = example.input_ids
    assert ids == full[: len(ids)] and ids[-1] == end
    assert tokenizer.decode(full[len(ids) :]) == "\n"  # what the template writes after the turn is not trained on
    _, _, loss = collate([example], tokenizer.pad_token_id)
    assert loss[0].tolist() == [0.0] * len(prompt) + [1.0] * (len(ids) - len(prompt))
    response_ids = ids[len(prompt) :]
    # The tags stay single tokens inside the assistant turn.
    order = ["<Parallel>", "<Path>", "</Path>", "<Path>", "</Path>", "</Parallel>", "<Summary>", "</Summary>"]
    tag_ids = set(tokenizer.convert_tokens_to_ids(order))
    assert [t for t in response_ids if t in tag_ids] == tokenizer.convert_tokens_to_ids(order)


def test_chat_template_tokens_are_masked_and_the_turn_ends_with_its_end_token(chat_tokenizer):
    from parallel_r1.prompts import build_prompt, prompt_format

    fmt = prompt_format(chat_tokenizer, chat_template="on")
    instruction = build_prompt("Tom has 3 apples and buys 4. How many?")
    example = encode_record(chat_tokenizer, fmt.wrap(instruction), CHAT_RESPONSE, 4096, fmt.end_id)
    _check_masks_exactly_the_template(chat_tokenizer, example, instruction)


def test_sft_stage_trains_through_the_models_chat_template(tmp_path, chat_tokenizer):
    import json

    from parallel_r1.models import save_model
    from parallel_r1.prompts import SEQUENTIAL_TEMPLATE, build_prompt
    from parallel_r1.tiny import build_model

    model_dir = save_model(
        build_model(chat_tokenizer, hidden_size=32, num_layers=1, num_heads=2), chat_tokenizer, tmp_path / "m"
    )
    rows = [{"question": f"Tom has {i} apples and buys 4. How many?", "response": CHAT_RESPONSE} for i in range(4)]
    data = tmp_path / "cold.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = f"""
stages:
  - name: sft
    kind: sft
    model: {{name_or_path: {model_dir}}}
    data: {{source: {data}, prompt: sequential, chat_template: on}}
    max_steps: 1
"""
    trainer = SFTTrainer(parse_recipe(recipe).stages[0], tmp_path / "sft", init_model=str(model_dir), seed=0)
    assert len(trainer.train_examples) == 4
    for row in rows:
        instruction = build_prompt(row["question"], SEQUENTIAL_TEMPLATE)
        expected = _conversation_ids(chat_tokenizer, instruction)
        example = next(e for e in trainer.train_examples if e.input_ids[: len(expected)] == expected)
        _check_masks_exactly_the_template(chat_tokenizer, example, instruction)
