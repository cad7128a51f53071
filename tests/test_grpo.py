import copy
import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from parallel_r1.batch import RolloutBatch, collate_rollouts, recompute_logprobs
from parallel_r1.config import GRPOConfig
from parallel_r1.files import read_jsonl
from parallel_r1.format import TagIds
from parallel_r1.grpo import GRPOTrainer, policy_update
from parallel_r1.objectives import (
    clipped_policy_loss,
    group_advantages,
    informative_groups,
    kl_k3,
    logprob_gap,
    tis_weights,
    token_mean,
)
from parallel_r1.trainer import final_model


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, -1.0, 1.0, -1.0], [1.2, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    adv = group_advantages(rewards)
    std0 = math.sqrt(4 / 3)  # unbiased std of (1, -1, 1, -1)
    assert torch.allclose(adv[0], torch.tensor([1, -1, 1, -1]) / std0, atol=1e-5)
    mean1 = 4.2 / 4
    centred1 = torch.tensor([1.2, 1.0, 1.0, 1.0]) - mean1
    assert torch.allclose(adv[1], centred1 / centred1.std(), atol=1e-4)
    assert torch.equal(adv[2], torch.zeros(4))


def test_dr_grpo_does_not_divide_by_std():
    rewards = torch.tensor([[1.0, -1.0, -1.0, -1.0], [1.2, 1.0, 1.0, 1.0]])
    adv = group_advantages(rewards, scale=False)
    assert torch.allclose(adv[0], torch.tensor([1.5, -0.5, -0.5, -0.5]))
    assert torch.allclose(adv[1], torch.tensor([0.15, -0.05, -0.05, -0.05]), atol=1e-6)


def test_zero_variance_groups_are_found():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0], [1.0, -1.0, -1.0], [1.2, 1.0, 1.0]])
    assert informative_groups(rewards).tolist() == [False, False, True, True]


def _ratios_to_logps(ratios):
    old = torch.full((len(ratios),), -1.0)
    return old + torch.log(torch.tensor(ratios)), old


def test_clipped_loss_by_hand_inside_and_outside_the_clip_range():
    # Clip range [0.8, 1.28]. Rows: advantage +1 and -1; columns: ratios 0.5, 0.9, 1.0, 1.2, 1.5.
    ratios = [0.5, 0.9, 1.0, 1.2, 1.5]
    new, old = _ratios_to_logps(ratios)
    logp = torch.stack([new, new])
    old_logp = torch.stack([old, old])
    loss, clipped = clipped_policy_loss(logp - old_logp, torch.tensor([1.0, -1.0]), 0.2, 0.28)
    # A > 0: -min(r, clip(r)) -> a low ratio is not clipped, a high one is capped at 1.28.
    expected_pos = [-0.5, -0.9, -1.0, -1.2, -1.28]
    # A < 0: max(r, clip(r)) -> a low ratio is lifted to 0.8, a high one is not clipped.
    expected_neg = [0.8, 0.9, 1.0, 1.2, 1.5]
    assert torch.allclose(loss, torch.tensor([expected_pos, expected_neg]), atol=1e-6)
    assert clipped.tolist() == [[False, False, False, False, True], [True, False, False, False, False]]
    mask = torch.ones_like(loss)
    assert token_mean(clipped.float(), mask).item() == pytest.approx(2 / 10)


def test_clip_is_asymmetric():
    new, old = _ratios_to_logps([1.25, 0.75])
    loss, clipped = clipped_policy_loss(new[None] - old[None], torch.tensor([1.0]), 0.2, 0.28)
    assert clipped.tolist() == [[False, False]]  # 1.25 < 1.28; 0.75 with A > 0 is never clipped
    loss, clipped = clipped_policy_loss(new[None] - old[None], torch.tensor([-1.0]), 0.2, 0.28)
    assert clipped.tolist() == [[False, True]]
    assert loss[0, 1].item() == pytest.approx(0.8)


def test_token_level_aggregation_counts_tokens_not_sequences():
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert token_mean(values, mask).item() == pytest.approx(8 / 5)  # a sequence mean would give 2.5
    # Micro-batches divided by the whole mini-batch's token count add up to the mini-batch mean.
    parts = token_mean(values[:1], mask[:1], num_tokens=5) + token_mean(values[1:], mask[1:], num_tokens=5)
    assert parts.item() == pytest.approx(8 / 5)


def test_gradient_equals_policy_gradient_when_old_equals_new():
    torch.manual_seed(0)
    logp = (-torch.rand(3, 5)).requires_grad_()
    adv = torch.tensor([0.7, -1.3, 2.0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    loss, _ = clipped_policy_loss(logp - logp.detach(), adv, 0.2, 0.28)
    token_mean(loss, mask).backward()
    # d/d logp of -(1/N) sum_t A_b r_bt at r = 1 is -A_b / N on trained-on tokens.
    expected = -adv[:, None] * mask / mask.sum()
    assert torch.allclose(logp.grad, expected, atol=1e-7)


def test_k3_kl_by_hand():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.0, -1.5]])
    kl = kl_k3(logp, ref)
    assert kl[0, 0].item() == 0.0
    assert kl[0, 1].item() == pytest.approx(math.exp(0.5) - 0.5 - 1)


def _fake_rollout(prompt, response, sampled, logprobs):
    return SimpleNamespace(prompt_ids=prompt, response_ids=response, sampled_mask=sampled, logprobs=logprobs)


def test_collate_masks_only_sampled_response_tokens():
    rollouts = [
        _fake_rollout([5, 6, 7], [8, 9, 10], [True, False, True], [-0.1, 0.0, -0.3]),
        _fake_rollout([5], [11], [True], [-0.5]),
    ]
    batch = collate_rollouts(rollouts, [1.0, -1.0], pad_id=0)
    assert batch.input_ids_BT.tolist() == [[5, 6, 7, 8, 9, 10], [0, 0, 0, 0, 5, 11]]
    assert batch.attention_mask_BT.tolist() == [[1] * 6, [0, 0, 0, 0, 1, 1]]
    assert batch.loss_mask_BT.tolist() == [[0, 0, 0, 1, 0, 1], [0, 0, 0, 0, 0, 1]]
    assert torch.allclose(batch.old_logp_BT[0, 3:], torch.tensor([-0.1, 0.0, -0.3]))
    assert batch.adv_B.tolist() == [1.0, -1.0]


def _favoured_logmass(model, batch, tags, favoured):
    """Mean over trained-on positions of log p(any favoured token | context)."""
    from parallel_r1.attention import build_layout, model_attention

    with torch.no_grad():
        layout = build_layout(batch.input_ids_BT, batch.attention_mask_BT, tags, "seen")
        mask = model_attention(model, layout)
        logits = model(input_ids=batch.input_ids_BT, attention_mask=mask, position_ids=layout.positions).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)[..., favoured].logsumexp(-1)
        m = batch.loss_mask_BT[:, 1:]
        return ((logp * m).sum() / m.sum()).item()


def test_one_grpo_step_raises_the_probability_of_a_rewarded_token(tiny_model, tiny_tokenizer):
    from parallel_r1.engine import ParallelEngine, SamplingParams

    tags = TagIds.from_tokenizer(tiny_tokenizer)
    favoured = [tiny_tokenizer.convert_tokens_to_ids(d) for d in "0123456789"]
    engine = ParallelEngine(tiny_model, tiny_tokenizer, max_batch_size=64)
    n = 16
    # Reward: the share of sampled tokens that are digits. The update needs every group to carry a signal:
    # the first seed whose draw gives that is used, whichever it is.
    for seed in range(20):
        params = SamplingParams(temperature=1.0, seed=seed, max_response_tokens=12, variant="seen", max_blocks=0)
        rollouts = engine.generate(["Question: Tom has 3 apples", "Amy reads 12 pages"], n=n, params=params)
        shares = [sum(t in favoured for t in r.response_ids) / len(r.response_ids) for r in rollouts]
        rewards = torch.tensor(shares).view(2, n)
        if informative_groups(rewards).all():
            break
    else:
        pytest.fail("no seed in 0..19 drew two groups with differing rewards")
    adv = group_advantages(rewards)
    batch = collate_rollouts(rollouts, adv.flatten().tolist(), tiny_tokenizer.pad_token_id)
    before = _favoured_logmass(tiny_model, batch, tags, favoured)

    cfg = GRPOConfig(micro_batch_size=8)
    accelerator = Accelerator(cpu=True)
    punished = copy.deepcopy(tiny_model)

    def update(model, advantages):
        batch.adv_B = advantages
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        return policy_update(
            accelerator,
            model,
            optimizer,
            batch,
            cfg,
            tags,
            "seen",
            max_grad_norm=1.0,
            num_tokens=batch.loss_mask_BT.sum().item(),
            num_sequences=len(rollouts),
        )

    out = update(tiny_model, adv.flatten())
    after = _favoured_logmass(tiny_model, batch, tags, favoured)
    assert out["grad_norm"] > 0 and out["tokens"] == batch.loss_mask_BT.sum().item()
    assert out["clipped"] == 0  # at old == new log-probs nothing is clipped on the first update
    assert after > before + 0.05, (before, after)
    # The same step with the advantages negated ends far lower: the direction comes from the reward.
    update(punished, -adv.flatten())
    assert _favoured_logmass(punished, batch, tags, favoured) < after - 0.05


@pytest.mark.parametrize("variant", ["seen", "unseen", "threads"])
def test_engine_logprobs_equal_the_training_forward(tiny_model, tiny_tokenizer, variant):
    """What makes `old_logprobs: auto` use the engine's log-probs with the hf backend."""
    from parallel_r1.engine import ParallelEngine, SamplingParams

    tags = TagIds.from_tokenizer(tiny_tokenizer)
    # An output layer with a bias towards the tags, so that responses open blocks and fork paths.
    head = torch.nn.Linear(tiny_model.config.hidden_size, tiny_model.lm_head.weight.shape[0], bias=True)
    with torch.no_grad():
        head.weight.copy_(tiny_model.lm_head.weight)
        head.bias.zero_()
        head.bias[[tags.parallel_open, tags.path_close, tags.summary_close]] = torch.tensor([4.0, 3.0, 3.0])
    tiny_model.lm_head = head
    engine = ParallelEngine(tiny_model, tiny_tokenizer)
    params = SamplingParams(temperature=0.7, seed=1, max_response_tokens=24, max_path_tokens=6, variant=variant)
    rollouts = engine.generate(["Question: Amy reads", "Question: Tom has 3 apples"], n=3, params=params)
    assert all(r.structure.num_blocks > 0 for r in rollouts)
    if variant != "seen":  # the engine inserts tags when it forks and joins paths; they are not trained on
        assert any(not s for r in rollouts for s in r.sampled_mask)
    batch = collate_rollouts(rollouts, [0.0] * len(rollouts), tiny_tokenizer.pad_token_id)
    recomputed = recompute_logprobs(tiny_model, batch, tags, variant, temperature=0.7, micro_batch_size=4)
    assert torch.allclose(recomputed, batch.old_logp_BT * batch.loss_mask_BT, atol=1e-4)


def test_tis_weights_are_the_capped_probability_ratio():
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    sampler = torch.tensor([[-1.0, -1.0, -2.0]])
    w = tis_weights(old, sampler, cap=2.0)
    assert torch.allclose(w, torch.tensor([[1.0, math.exp(-1.0), 2.0]]))  # exp(1.5) > 2 is truncated
    gap = logprob_gap(old, sampler, torch.tensor([[1.0, 1.0, 0.0]]), threshold=0.5)
    assert gap == {"gap_sum": 1.0, "gap_max": 1.0, "gap_over": 1, "gap_tokens": 2.0}


def test_tis_corrects_a_perturbed_sampler():
    """Tokens drawn from a sampler q that is not the trained policy p: the surrogate's gradient is biased
    unless each token is weighted by p/q; with the weights it matches the exact policy gradient."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=g).requires_grad_()
    reward = torch.arange(6, dtype=torch.float32)
    (exact,) = torch.autograd.grad((torch.softmax(theta, 0) * reward).sum(), theta)
    q_logits = theta.detach() + 1.5 * torch.randn(6, generator=g)
    tokens = torch.multinomial(torch.softmax(q_logits, 0), 200_000, replacement=True, generator=g)
    logp_B1 = torch.log_softmax(theta, 0)[tokens][:, None]
    sampler_B1 = torch.log_softmax(q_logits, 0)[tokens][:, None]
    adv_B = reward[tokens] - reward.mean()
    mask = torch.ones_like(sampler_B1)

    def gradient(weight_B1):
        per_token, _ = clipped_policy_loss(logp_B1 - logp_B1.detach(), adv_B, 0.2, 0.28)
        (grad,) = torch.autograd.grad(token_mean(per_token * weight_B1, mask), theta, retain_graph=True)
        return -grad

    def error(grad):
        return ((grad - exact).norm() / exact.norm()).item()

    corrected = gradient(tis_weights(logp_B1.detach(), sampler_B1, cap=100.0))
    biased = gradient(torch.ones_like(mask))
    assert error(corrected) < 0.02 and error(biased) > 0.1, (error(corrected), error(biased))


GRPO_STAGE = """
name: gap
logging: {progress: false}
stages:
  - name: rl
    kind: grpo
    variant: unseen
    model: {name_or_path: tiny, tiny: {hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 128}}
    data: {source: task, task_size: 8, prompt: question}
    max_steps: 1
    grpo:
      prompts_per_step: 2
      n: 4
      mini_batch_size: 1
      filter_zero_variance: false
      rollout: {max_response_tokens: 24, max_path_tokens: 6, temperature: 1.0}
"""


@pytest.mark.parametrize("tis_cap", [None, 1.1])
def test_every_step_logs_the_sampler_gap_and_tis_corrects_it(tmp_path, tis_cap):
    """The hf engine's log-probs equal the trainer's (gap ~ 0, measured on the first optimiser step); a
    sampler whose log-probs are all 0.3 too high shows a gap of 0.3 on every trained token, and with
    `tis_cap` the trainer weights them by exp(-0.3)."""
    from parallel_r1.config import parse_recipe

    recipe = parse_recipe(GRPO_STAGE)
    stage = recipe.stages[0]
    exact = GRPOTrainer(stage, tmp_path / "exact", init_model="tiny", seed=0)
    metrics, _ = exact.train_step(0, [0, 1])
    assert metrics["mismatch_max"] < 1e-4 and metrics["mismatch_share"] == 0.0
    assert 0 < metrics["mismatch_tokens"] < metrics["trained_tokens"]  # mini-batch 1 of 2, before any update

    stage.grpo.tis_cap = tis_cap
    stage.grpo.old_logprobs = "recompute"
    skewed = GRPOTrainer(stage, tmp_path / "skewed", init_model="tiny", seed=0)
    generate = skewed.engine.generate

    def perturbed(*args, **kwargs):
        rollouts = generate(*args, **kwargs)
        for r in rollouts:
            r.logprobs = [lp + 0.3 if s else lp for lp, s in zip(r.logprobs, r.sampled_mask)]
        return rollouts

    skewed.engine.generate = perturbed
    metrics, _ = skewed.train_step(0, [0, 1])
    assert metrics["mismatch_tokens"] == metrics["trained_tokens"] > 0
    assert abs(metrics["mismatch_mean"] - 0.3) < 1e-4 and metrics["mismatch_share"] == 1.0
    if tis_cap is None:
        assert "tis_weight" not in metrics
    else:
        assert abs(metrics["tis_weight"] - math.exp(-0.3)) < 1e-4 and metrics["tis_truncated"] == 0.0


def test_micro_batches_drop_shared_padding_and_keep_the_log_probs(tiny_model, tiny_tokenizer):
    from parallel_r1.attention import response_logprobs

    tags = TagIds.from_tokenizer(tiny_tokenizer)
    lengths = [5, 30, 12, 30, 7]
    T = max(lengths)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(20, 290, (len(lengths), T), generator=g)
    attn = torch.tensor([[0] * (T - n) + [1] * n for n in lengths])
    ids = ids * attn
    zeros = torch.zeros(len(lengths), T)
    batch = RolloutBatch(
        ids, attn, attn.float(), zeros, torch.zeros(len(lengths)), zeros, torch.ones_like(zeros), torch.zeros_like(ids)
    )
    assert batch.by_length()[:2] == [1, 3]
    short = batch.micro_batch([0, 4])
    assert short.input_ids_BT.shape == (2, 7) and torch.equal(short.input_ids_BT[1], ids[4, -7:])
    with torch.no_grad():
        want, _ = response_logprobs(tiny_model, ids, attn, tags, variant="seen")
    got = recompute_logprobs(tiny_model, batch, tags, "seen", temperature=1.0, micro_batch_size=2)
    scored = attn.clone()
    scored[torch.arange(len(lengths)), T - torch.tensor(lengths)] = 0  # a row's first token has no context
    assert torch.allclose(got * scored, want * scored, atol=1e-5)


def _capturing(trainer):
    """The trainer's engine, made to keep each step's rollouts in the returned list."""
    seen, generate = [], trainer.engine.generate

    def capture(*args, **kwargs):
        seen[:] = generate(*args, **kwargs)
        return seen

    trainer.engine.generate = capture
    return seen


def test_logged_ban_mass_is_the_probability_the_bans_remove(tmp_path):
    """Seen with max_blocks 0 bans <Parallel> at every token and nothing else: the mass removed from a
    sampled token's softmax is the model's probability of <Parallel> there, computed here by hand."""
    from parallel_r1.config import parse_recipe

    text = GRPO_STAGE.replace("variant: unseen", "variant: seen").replace("temperature: 1.0", "temperature: 0.8")
    stage = parse_recipe(text.replace("max_path_tokens: 6,", "max_path_tokens: 6, max_blocks: 0,")).stages[0]
    trainer = GRPOTrainer(stage, tmp_path, init_model="tiny", seed=0)
    rollouts = _capturing(trainer)
    before = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model)).eval()
    metrics, _ = trainer.train_step(0, [0, 1])
    masses = []
    for r in rollouts:
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        with torch.no_grad():
            probs = torch.softmax(before(input_ids=ids).logits[0] / 0.8, -1)
        start = len(r.prompt_ids) - 1  # the logits that predicted the first response token
        masses += [probs[start + j, trainer.tags.parallel_open].item() for j, s in enumerate(r.sampled_mask) if s]
    assert metrics["ban_mass_mean"] > 0
    assert metrics["ban_mass_mean"] == pytest.approx(sum(masses) / len(masses), rel=1e-5)
    assert metrics["ban_mass_max"] == pytest.approx(max(masses), rel=1e-5)
    assert metrics["mismatch_max"] < 1e-4


@pytest.mark.parametrize("old_logprobs", ["auto", "recompute"])
def test_behaviour_logprobs_put_sampler_and_trainer_on_the_policy_that_acted(tmp_path, old_logprobs):
    """On (the hf default): the engine records, and the trainer replays, log-probs of the banned,
    renormalised distribution; they agree to 1e-4 while differing from the full softmax's by far more
    (the gap a trainer that did not replay would show). Off: the same tokens, scored as before, under the
    full softmax on both sides. The ban mass is logged either way."""
    from parallel_r1.attention import response_logprobs
    from parallel_r1.config import parse_recipe

    stage = parse_recipe(GRPO_STAGE).stages[0]
    stage.grpo.old_logprobs = old_logprobs
    runs = {}
    for setting in (None, False):
        stage.grpo.behaviour_logprobs = setting
        trainer = GRPOTrainer(stage, tmp_path / str(setting), init_model="tiny", seed=0)
        assert trainer.engine.behaviour_logprobs is (setting is None)
        rollouts = _capturing(trainer)
        model = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model)).eval()
        metrics, _ = trainer.train_step(0, [0, 1])
        assert metrics["mismatch_max"] < 1e-4 and metrics["ban_mass_mean"] > 0
        full = []
        for r in rollouts:
            ids = torch.tensor([r.prompt_ids + r.response_ids])
            with torch.no_grad():
                lp, _ = response_logprobs(model, ids, torch.ones_like(ids), trainer.tags, "unseen")
            sampled = torch.tensor(r.sampled_mask)
            full.append((torch.tensor(r.logprobs) - lp[0, len(r.prompt_ids) :])[sampled].abs().max().item())
        runs[setting] = metrics, [r.response_ids for r in rollouts], max(full)
    (on, on_ids, on_gap), (off, off_ids, off_gap) = runs[None], runs[False]
    assert on_ids == off_ids  # the setting changes what is recorded, not what is sampled
    assert on["ban_mass_mean"] == pytest.approx(off["ban_mass_mean"])
    assert on_gap > 1e-3 and off_gap < 1e-4


# ---------------------------------------------------------------------------------------------------
# Dynamic sampling and overlong shaping, end to end on the tiny model with constructed rewards.

REFILL_STAGE = """
name: refill
logging: {progress: false}
stages:
  - name: rl
    kind: grpo
    variant: unseen
    model: {name_or_path: tiny, tiny: {hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 128}}
    data: {source: task, task_size: 24, prompt: question}
    lr: 1.0e-3
    max_steps: 3
    save_every: 1
    keep_last: 5
    grpo:
      prompts_per_step: 4
      n: 2
      mini_batch_size: 2
      dynamic_sampling: true
      max_refill_rounds: 2
      rollout: {max_response_tokens: 12, max_path_tokens: 6}
"""


def _constructed_rewards(monkeypatch):
    """Rewards by construction: a group whose problem's answer is "DROP" scores 0 on every sample (not
    informative), any other group -1, +1, -1, ... (informative), whatever was sampled."""
    from parallel_r1 import grpo

    score = grpo.score_batch

    def constructed(texts, golds, *args, **kwargs):
        scores = score(texts, golds, *args, **kwargs)
        return [
            dataclasses.replace(s, reward=0.0 if gold == "DROP" else (1.0 if k % 2 else -1.0))
            for k, (s, gold) in enumerate(zip(scores, golds))
        ]

    monkeypatch.setattr(grpo, "score_batch", constructed)


def _refill_trainer(stage, folder, keep_positions):
    """A trainer whose problems at the other positions of epoch 0's order are answered "DROP"; its engine
    keeps every round's rollouts (`trainer.sampled`, a list per generate call)."""
    trainer = GRPOTrainer(stage, folder, init_model="tiny", seed=0)
    first = trainer._order(0)
    drop = {first[k] for k in range(len(first)) if k not in keep_positions}
    trainer.problems = [
        dataclasses.replace(p, answer="DROP") if i in drop else p for i, p in enumerate(trainer.problems)
    ]
    trainer.sampled, generate = [], trainer.engine.generate

    def keep(*args, **kwargs):
        trainer.sampled.append(generate(*args, **kwargs))
        return trainer.sampled[-1]

    trainer.engine.generate = keep
    return trainer, drop


class _Killed(Exception):
    pass


def test_dynamic_sampling_refills_to_the_full_step_and_resumes_its_rounds_exactly(tmp_path, monkeypatch):
    """Epoch 0's order keeps positions 0, 2, 4, 6 (step 1: 2 of its first 4 prompts informative, 2 more in a
    refill round of 4), 8 alone of 8..19 (step 2: 1 informative group after the cap of 2 refill rounds) and
    20, 22 (step 3 refills from epoch 1's order, where the same problems are kept). The rounds of every step
    are also derived by hand from the data order. A run killed in step 3's refill round, after its data
    position moved into epoch 1 but before a checkpoint saved it, resumes the same rounds exactly."""
    from parallel_r1.config import parse_recipe
    from parallel_r1.objectives import refill_size

    _constructed_rewards(monkeypatch)
    stage = parse_recipe(REFILL_STAGE).stages[0]
    keep_positions = {0, 2, 4, 6, 8, 20, 22}
    trainer, drop = _refill_trainer(stage, tmp_path / "whole", keep_positions)
    stream = trainer._order(0) + trainer._order(1)
    trainer.train()
    rows = read_jsonl(tmp_path / "whole" / "metrics.jsonl")

    # The rounds by hand: the next prompts of the stream, refill_size(missing, sampled, kept, 4) at a time.
    at = 0
    for row in rows:
        rounds = [stream[at : at + 4]]
        while len(rounds) <= 2 and sum(i not in drop for r in rounds for i in r) < 4:
            sampled, kept = sum(map(len, rounds)), sum(i not in drop for r in rounds for i in r)
            start = at + sampled
            rounds.append(stream[start : start + refill_size(4 - kept, sampled, kept, 4)])
        at += sum(map(len, rounds))
        assert row["data_indices"] == [i for r in rounds for i in r]
        assert (row["sampling_rounds"], row["prompts_sampled"]) == (len(rounds), sum(map(len, rounds)))
        assert row["groups_kept"] == min(4, sum(i not in drop for r in rounds for i in r))
    assert [r["sampling_rounds"] for r in rows[:2]] == [2, 3] and [r["groups_kept"] for r in rows[:2]] == [4, 1]
    assert rows[2]["sampling_rounds"] >= 2 and rows[2]["epoch"] == 1  # step 3 refilled from epoch 1's order

    # Step 1 had to refill and trains on the full 4 groups: every sampled token of their 8 responses.
    rollouts = [x for call in trainer.sampled[:2] for x in call]
    trained = [x for x, i in zip(rollouts, [i for i in rows[0]["data_indices"] for _ in range(2)]) if i not in drop]
    assert len(trained) == 8 and rows[0]["trained_tokens"] == sum(sum(x.sampled_mask) for x in trained)
    assert rows[0]["optimizer_steps"] == 2 and rows[1]["optimizer_steps"] == 1  # step 2: one group, one batch

    # Killed in step 3's second round; a fresh trainer resumes from the checkpoint of step 2.
    killed, _ = _refill_trainer(stage, tmp_path / "killed", keep_positions)
    generate = killed.engine.generate

    def dying(*args, **kwargs):
        if len(killed.sampled) == 6:  # 2 + 3 rounds done, step 3's first done: this is its refill round
            raise _Killed
        return generate(*args, **kwargs)

    killed.engine.generate = dying
    with pytest.raises(_Killed):
        killed.train()
    assert killed.state.epoch == 1  # the stream had moved on in memory
    resumed, _ = _refill_trainer(stage, tmp_path / "killed", keep_positions)
    assert (resumed.state.step, resumed.state.epoch) == (2, 0)
    resumed.train()
    again = read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    keys = ("data_indices", "sampling_rounds", "prompts_sampled", "groups_kept", "loss", "reward", "grad_norm")
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in rows]
    ours = load_file(final_model(tmp_path / "killed") / "model.safetensors")
    theirs = load_file(final_model(tmp_path / "whole") / "model.safetensors")
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_overlong_filter_and_penalty(tmp_path, monkeypatch):
    """Responses cut at the 12-token cap: with overlong_filter they are not trained on; with a buffer of 4
    each response's reward carries -(length - 8) / 4 * 0.5 (clamped to [-0.5, 0]) into its advantage."""
    from parallel_r1.config import parse_recipe

    _constructed_rewards(monkeypatch)
    text = REFILL_STAGE.replace("dynamic_sampling: true", "overlong_filter: true")
    stage = parse_recipe(
        text.replace("max_refill_rounds: 2", "overlong_buffer: 4\n      overlong_penalty: 0.5")
    ).stages[0]
    trainer, _ = _refill_trainer(stage, tmp_path, set(range(24)))
    # A bias towards EOS (in sampling and training alike) so that some responses stop before the cap; the
    # first step whose draw has both kinds is checked.
    bias = torch.zeros(len(trainer.tokenizer))
    bias[trainer.tokenizer.eos_token_id] = 3.0
    trainer.accelerator.unwrap_model(trainer.model).lm_head.register_forward_hook(lambda m, i, out: out + bias)
    for step in range(10):
        metrics, records = trainer.train_step(step, [4 * step + k for k in range(4)])
        rollouts = trainer.sampled[-1]
        if {x.finish_reason for x in rollouts} == {"length", "stop"}:
            break
    else:
        pytest.fail("no step of 10 drew responses both cut at the cap and stopped before it")
    assert metrics["trained_tokens"] == sum(sum(x.sampled_mask) for x in rollouts if x.finish_reason != "length")
    penalties = [-0.5 * min(max(len(x.response_ids) - 8, 0) / 4, 1.0) for x in rollouts]
    assert [r["overlong_penalty"] for r in records] == pytest.approx(penalties, abs=1e-6)
    shaped = torch.tensor([r["reward"] + p for r, p in zip(records, penalties)]).view(4, 2)
    assert [r["advantage"] for r in records] == pytest.approx(group_advantages(shaped).flatten().tolist(), abs=1e-6)
    assert metrics["overlong_penalty"] == pytest.approx(sum(penalties) / len(penalties), abs=1e-6)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("dynamic_sampling: true\n      filter_zero_variance: false", "dynamic_sampling refills the groups"),
        ("max_refill_rounds: 0", "max_refill_rounds must be >= 1"),
        ("overlong_buffer: 24", r"overlong_buffer must be in \[0, rollout.max_response_tokens \(24\)\)"),
        ("overlong_buffer: -1", "overlong_buffer must be in"),
        ("overlong_penalty: 0", "overlong_penalty must be > 0"),
        ("tis_mode: sequence_mask", "tis_mode sequence_mask needs tis_cap"),
        ("tis_mode: sequence_clip", r"'sequence_clip' is not one of .* \(did you mean 'sequence_mask'\?\)"),
        (
            "loss_agg: seq-mean",
            r"'seq-mean' is not one of \['token-mean', 'seq-mean-token-sum', 'seq-mean-token-mean'\]",
        ),
        ("ratio_level: response", r"'response' is not one of \['token', 'sequence'\]"),
    ],
)
def test_objective_settings_are_checked_at_load_with_the_line(setting, message):
    from parallel_r1.config import ConfigError, parse_recipe

    text = GRPO_STAGE.replace("      filter_zero_variance: false\n", f"      {setting}\n")
    with pytest.raises(ConfigError, match=rf"recipe.yaml:\d+: stages\[0\]\.grpo.*: {message}"):
        parse_recipe(text, "recipe.yaml")


def test_the_dapo_recipe_turns_on_the_dapo_set():
    from parallel_r1.config import load_recipe

    configs = Path(__file__).resolve().parents[1] / "configs"
    dapo, s1 = load_recipe(configs / "unseen_s1_dapo.yaml"), load_recipe(configs / "unseen_s1.yaml")
    g = dapo.stages[-1].grpo
    assert (g.clip_low, g.clip_high, g.loss_agg, g.ratio_level) == (0.2, 0.28, "token-mean", "token")
    assert g.dynamic_sampling and g.filter_zero_variance and g.overlong_buffer == 512 and g.overlong_penalty == 1.0
    # Only the DAPO stage's objective differs from the recipe it extends.
    assert dapo.stages[:2] == s1.stages[:2] and dapo.stages[-1].data == s1.stages[-1].data
    plain = dataclasses.replace(g, dynamic_sampling=False, overlong_buffer=0)
    assert plain == s1.stages[-1].grpo


@pytest.mark.parametrize("variant", ["seen", "unseen", "threads"])
def test_two_steps_with_packed_and_grouped_rows_give_the_padded_rows_weights(tmp_path, monkeypatch, variant):
    """The update's row layouts compute the same loss: two GRPO steps (old log-probs recomputed, three
    micro-batches of the step) end at the same weights with each layout, to 2e-5 absolute, 2% of one Adam
    step at lr 1e-3 (float32 sums in another order, amplified where Adam divides a nearly zero gradient by
    the root of its second moment: tests/test_distributed.py's tolerance); losses to 1e-5 relative."""
    from parallel_r1 import batch as batch_module
    from parallel_r1.config import parse_recipe

    _constructed_rewards(monkeypatch)
    calls, packed = [], batch_module.packed_logprobs

    def counting(*args, share_prompts, **kwargs):
        calls.append(share_prompts)
        return packed(*args, share_prompts=share_prompts, **kwargs)

    monkeypatch.setattr(batch_module, "packed_logprobs", counting)
    weights, losses, scored = {}, {}, {}
    for rows, tokens in (("padded", 0), ("grouped", 0), ("packed", 60)):
        calls.clear()
        stage = parse_recipe(GRPO_STAGE.replace("variant: unseen", f"variant: {variant}")).stages[0]
        stage.grpo.update_rows, stage.grpo.micro_batch_tokens = rows, tokens
        stage.grpo.micro_batch_size, stage.grpo.old_logprobs = 3, "recompute"
        stage.lr = 1e-3
        trainer = GRPOTrainer(stage, tmp_path / rows, init_model="tiny", seed=0)
        start = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        losses[rows] = [trainer.train_step(step, [2 * step, 2 * step + 1])[0]["loss"] for step in range(2)]
        weights[rows] = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        scored[rows] = set(calls)
    # the setting picks the layout: padded never packs, grouped shares each group's prompt, packed does not
    assert scored == {"padded": set(), "grouped": {True}, "packed": {False}}
    assert (weights["padded"] - start).abs().max() > 1e-3  # the steps trained
    for rows in ("grouped", "packed"):
        assert (weights[rows] - weights["padded"]).abs().max() < 2e-5, rows
        assert losses[rows] == pytest.approx(losses["padded"], rel=1e-5, abs=1e-7), rows


def test_a_grpo_step_on_nested_unseen_blocks_trains_what_it_sampled(tmp_path, monkeypatch):
    """Rollouts with blocks nested two deep (a model biased towards <Parallel>): the trainer's log-probs of the
    sampled tokens, behaviour bans replayed, equal the engine's (mismatch under the stated 1e-4) over the
    update's tokens, and the step's metrics report paths per block and depth."""
    from test_engine import with_bias

    from parallel_r1 import trainer as trainer_module
    from parallel_r1.config import parse_recipe

    loader = trainer_module.load_model_and_tokenizer

    def biased(*args, **kwargs):
        model, tokenizer = loader(*args, **kwargs)
        tags = TagIds.from_tokenizer(tokenizer)
        bias = {tags.parallel_open: 4.0, tags.path_close: 2.0, tags.summary_close: 3.0}
        return with_bias(model, bias), tokenizer

    monkeypatch.setattr(trainer_module, "load_model_and_tokenizer", biased)
    text = GRPO_STAGE.replace("max_path_tokens: 6,", "max_path_tokens: 12, max_depth: 2, max_blocks: 6,")
    stage = parse_recipe(text.replace("max_response_tokens: 24", "max_response_tokens: 64")).stages[0]
    trainer = GRPOTrainer(stage, tmp_path, init_model="tiny", seed=0)
    rollouts = _capturing(trainer)
    metrics, _ = trainer.train_step(0, [0, 1])
    assert max(r.structure.depth for r in rollouts) == 2
    assert metrics["mismatch_max"] < 1e-4 and metrics["trained_tokens"] > 100
    assert 1.0 < metrics["block_depth"] <= 2.0 and metrics["paths_per_block"] == 2.0


def test_the_speedup_reward_is_the_share_of_tokens_off_the_critical_path(tmp_path, monkeypatch):
    """With reward.speedup_value, a correct Unseen rollout's record carries speedup_value * (1 - positions /
    tokens), positions its critical path; Seen rollouts gain nothing."""
    from test_engine import with_bias

    from parallel_r1 import rewards
    from parallel_r1 import trainer as trainer_module
    from parallel_r1.config import parse_recipe
    from parallel_r1.rollout import unseen_positions

    loader = trainer_module.load_model_and_tokenizer

    def biased(*args, **kwargs):
        model, tokenizer = loader(*args, **kwargs)
        tags = TagIds.from_tokenizer(tokenizer)
        return with_bias(model, {tags.parallel_open: 3.0, tags.path_close: 2.0, tags.summary_close: 3.0}), tokenizer

    monkeypatch.setattr(trainer_module, "load_model_and_tokenizer", biased)
    # Every other response is correct, whatever it says.
    answers = iter(range(10**6))
    monkeypatch.setattr(rewards, "extract_answer", lambda text: str(next(answers) % 2))
    monkeypatch.setattr(rewards, "verify", lambda answer, gold, timeout_s: answer == "1")
    text = GRPO_STAGE.replace("max_path_tokens: 6,", "max_path_tokens: 10,").replace(
        "filter_zero_variance: false", "filter_zero_variance: false\n      reward: {speedup_value: 0.5}"
    )
    for variant in ("unseen", "seen"):
        stage = parse_recipe(text.replace("variant: unseen", f"variant: {variant}")).stages[0]
        trainer = GRPOTrainer(stage, tmp_path / variant, init_model="tiny", seed=0)
        rollouts = _capturing(trainer)
        _, records = trainer.train_step(0, [0, 1])
        assert len(records) == len(rollouts) and {rec["correct"] for rec in records} == {True, False}
        for r, rec in zip(rollouts, records):
            expected = 0.5 * (1 - unseen_positions(r) / len(r.response_ids)) if variant == "unseen" else 0.0
            assert rec["speedup_bonus"] == pytest.approx(expected if rec["correct"] else 0.0)
        if variant == "unseen":
            assert any(rec["speedup_bonus"] > 0 for rec in records)


def test_a_grpo_step_on_distinct_plans_replays_their_bans(tmp_path, monkeypatch):
    """distinct_plans in GRPO: the trainer's recomputed old log-probs replay the plan-dependent bans (rows the
    trainer's own BanTable adds), so they equal the engine's behaviour log-probs (mismatch under 1e-4), and
    no sampled plan starts two lines alike."""
    from test_engine import with_bias

    from parallel_r1 import trainer as trainer_module
    from parallel_r1.config import parse_recipe

    loader = trainer_module.load_model_and_tokenizer

    def biased(*args, **kwargs):
        model, tokenizer = loader(*args, **kwargs)
        tags = TagIds.from_tokenizer(tokenizer)
        newline, six = tokenizer.encode("\n")[0], tokenizer.encode("6")[0]
        bias = {tags.parallel_open: 4.0, tags.path_close: 2.5, tags.summary_close: 3.0, tags.path_open: 2.0}
        return with_bias(model, {**bias, newline: 5.0, six: 4.0}), tokenizer

    monkeypatch.setattr(trainer_module, "load_model_and_tokenizer", biased)
    text = GRPO_STAGE.replace(
        "max_path_tokens: 6,", "max_path_tokens: 12, plans: true, max_paths: 3, distinct_plans: true,"
    )
    stage = parse_recipe(text.replace("max_response_tokens: 24", "max_response_tokens: 64")).stages[0]
    stage.grpo.old_logprobs = "recompute"
    trainer = GRPOTrainer(stage, tmp_path, init_model="tiny", seed=0)
    rollouts = _capturing(trainer)
    metrics, _ = trainer.train_step(0, [0, 1])
    lines = trainer.engine.plan_lines
    plans = [
        [line[0] for line in lines.lines(r.response_ids[b.token_span.start + 1 : b.paths[0].token_span.start])]
        for r in rollouts
        for b in r.structure.blocks
        if b.closed and b.paths
    ]
    assert sum(len(p) >= 2 for p in plans) >= 2 and all(len(set(p)) == len(p) for p in plans)
    assert metrics["mismatch_max"] < 1e-4 and metrics["trained_tokens"] > 50
    assert len(trainer.bans.table) > 8  # the plan-dependent rows were met
