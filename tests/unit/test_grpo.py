"""GRPO math on fixed tensors: advantages, the clipped loss and its gradient, k3 KL, entropy, log-probs."""

import math

import pytest
import torch

from zili.train.grpo import gather_logprobs, group_advantages, grpo_loss, token_entropy

# ---- advantages ----------------------------------------------------------------------------------------------


def test_advantages_by_hand_with_and_without_std():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 3.0])  # two prompts, G = 3, prompt-major
    # group 1: mean 2, deviations (-1, 0, 1), sample var (1 + 0 + 1) / 2 = 1 -> std 1
    # group 2: mean 1, deviations (-1, -1, 2), sample var (1 + 1 + 4) / 2 = 3 -> std sqrt(3)
    s3 = math.sqrt(3)
    got = group_advantages(rewards, 3, eps=0.0)
    assert got.tolist() == pytest.approx([-1.0, 0.0, 1.0, -1 / s3, -1 / s3, 2 / s3], abs=1e-6)
    got = group_advantages(rewards, 3)  # default eps 1e-4 is added to the std
    assert got.tolist() == pytest.approx([-1 / 1.0001, 0.0, 1 / 1.0001] + [x / (s3 + 1e-4) for x in (-1, -1, 2)],
                                         abs=1e-6)
    got = group_advantages(rewards, 3, scale_by_std=False)  # Dr. GRPO: centred only
    assert got.tolist() == [-1.0, 0.0, 1.0, -1.0, -1.0, 2.0]


def test_advantages_use_the_sample_std():
    # {0, 1}: mean 0.5, deviations ±0.5, sample std sqrt(0.5) -> ±0.7071 (the population std 0.5 would give ±1)
    got = group_advantages(torch.tensor([0.0, 1.0]), 2, eps=0.0)
    assert got.tolist() == pytest.approx([-math.sqrt(0.5), math.sqrt(0.5)], abs=1e-6)


def test_group_of_one_and_equal_rewards_give_exactly_zero():
    rewards = torch.tensor([0.3, 1.0, -2.0, 5.0])
    for scale in (True, False):
        assert group_advantages(rewards, 1, scale_by_std=scale).tolist() == [0.0] * 4
    # 0.1 is not exactly representable: its group mean need not round back to 0.1
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 1.0, 0.0, 0.0])
    got = group_advantages(rewards, 3)
    assert not got.isnan().any()
    assert got[:6].tolist() == [0.0] * 6 and got[6] > 0 > got[7]


def test_advantages_reject_bad_layouts():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 3), 3)


# ---- the loss ------------------------------------------------------------------------------------------------

# The 2x3 example: clip ε = 0.2 (range [0.8, 1.2]); A = +1 for sequence 0 and -2 for sequence 1; the last token
# of sequence 1 is padding (masked out). logprobs = old + log(ratio) with these ratios:
RATIOS = [[1.5, 0.7, 1.0], [0.5, 1.3, 1.0]]
OLD = [[-1.0, -2.0, -0.5], [-1.5, -0.3, -1.0]]
ADV = [1.0, -2.0]
MASK = [[True, True, True], [True, True, False]]
# per token, loss_t = -min(r·A, clip(r, 0.8, 1.2)·A):
#   seq 0, A = +1:  r 1.5 -> -min(1.5, 1.2)    = -1.2  (clipped term active: cut)
#                   r 0.7 -> -min(0.7, 0.8)    = -0.7  (unclipped active)
#                   r 1.0 -> -min(1.0, 1.0)    = -1.0
#   seq 1, A = -2:  r 0.5 -> -min(-1.0, -1.6)  = +1.6  (clipped term active: cut)
#                   r 1.3 -> -min(-2.6, -2.4)  = +2.6  (unclipped active)
# token-level:  (-1.2 - 0.7 - 1.0 + 1.6 + 2.6) / 5 = 1.3 / 5 = 0.26
# sequence:     (-2.9 / 3 + 4.2 / 2) / 2 = (-0.966667 + 2.1) / 2 = 0.566667
# clip fraction 2 / 5 = 0.4; mean ratio (1.5 + 0.7 + 1.0 + 0.5 + 1.3) / 5 = 1.0


def example(masked_logprob: float = 0.0):
    old = torch.tensor(OLD)
    logp = (old + torch.tensor(RATIOS).log()).clone()
    logp[1, 2] = masked_logprob
    return logp.requires_grad_(), old, torch.tensor(ADV), torch.tensor(MASK)


def test_loss_by_hand_token_level():
    logp, old, adv, mask = example()
    loss, metrics = grpo_loss(logp, old, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.26, abs=1e-6)
    assert metrics["clip_fraction"] == pytest.approx(0.4)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert "kl" not in metrics and all(type(v) is float for v in metrics.values())


def test_loss_by_hand_sequence_mean():
    logp, old, adv, mask = example()
    loss, _ = grpo_loss(logp, old, adv, mask, clip_eps=0.2, aggregation="sequence")
    assert loss.item() == pytest.approx((-2.9 / 3 + 4.2 / 2) / 2, abs=1e-6)


def test_gradient_is_cut_by_the_clip_and_minus_a_ratio_over_n_inside():
    logp, old, adv, mask = example()
    loss, _ = grpo_loss(logp, old, adv, mask, clip_eps=0.2)
    loss.backward()
    # d loss_t / d logp_t = -A·r / N where the unclipped term is active, 0 where the clip is (and on padding)
    expected = [[0.0, -1 * 0.7 / 5, -1 * 1.0 / 5], [0.0, 2 * 1.3 / 5, 0.0]]
    assert logp.grad.tolist() == [pytest.approx(row, abs=1e-6) for row in expected]


def test_asymmetric_clip():
    logp, old, adv, mask = example()
    # range [0.8, 1.6]: r = 1.5 with A > 0 is no longer cut (-1.5 instead of -1.2), r = 0.5 with A < 0 still is
    loss, metrics = grpo_loss(logp, old, adv, mask, clip_eps=(0.2, 0.6))
    assert loss.item() == pytest.approx((1.3 - 0.3) / 5, abs=1e-6)
    assert metrics["clip_fraction"] == pytest.approx(0.2)
    loss.backward()
    assert logp.grad[0, 0].item() == pytest.approx(-1.5 / 5, abs=1e-6)


def test_clip_edges_one_token_each():
    one = torch.ones(1, 1, dtype=torch.bool)
    for ratio, a, cut in [(1.3, 1.0, True), (0.7, -1.0, True), (1.3, -1.0, False), (0.7, 1.0, False),
                          (1.1, 1.0, False), (0.9, -1.0, False)]:
        logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
        loss, metrics = grpo_loss(logp, torch.zeros(1, 1), torch.tensor([a]), one, clip_eps=0.2)
        loss.backward()
        assert metrics["clip_fraction"] == (1.0 if cut else 0.0), (ratio, a)
        assert logp.grad.item() == pytest.approx(0.0 if cut else -a * ratio, abs=1e-6), (ratio, a)


def test_first_update_ratio_is_one_and_loss_is_minus_mean_advantage():
    logp, _, adv, mask = example()
    old = logp.detach().clone()
    loss, metrics = grpo_loss(logp, old, adv, mask, clip_eps=0.2)
    # token-level: every counted token weighs the same: -(3·1 + 2·(-2)) / 5 = 0.2
    assert loss.item() == pytest.approx(-(3 * 1.0 + 2 * -2.0) / 5, abs=1e-7)
    assert metrics == {"clip_fraction": 0.0, "ratio_mean": 1.0}
    per_token = torch.tensor([[0.5, -1.0, 2.0], [0.25, 3.0, 9.0]])  # (B, T) advantages work too
    loss, _ = grpo_loss(logp, old, per_token, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-(0.5 - 1.0 + 2.0 + 0.25 + 3.0) / 5, abs=1e-6)


def test_kl_k3_zero_at_the_reference_positive_elsewhere_with_the_analytic_gradient():
    logp, old, adv, mask = example()
    loss0, _ = grpo_loss(logp, old, adv, mask, clip_eps=0.2)
    _, metrics = grpo_loss(logp, old, adv, mask, clip_eps=0.2, kl_beta=0.5, ref_logprobs=logp.detach())
    assert metrics["kl"] == 0.0

    d = torch.tensor([[0.5, -0.5, 0.0], [1.0, -1.0, 50.0]])  # ref - logp; the 50 is on padding
    ref = logp.detach() + d
    beta = 0.1
    loss, metrics = grpo_loss(logp, old, adv, mask, clip_eps=0.2, kl_beta=beta, ref_logprobs=ref)
    k3 = [math.exp(x) - x - 1 for x in (0.5, -0.5, 0.0, 1.0, -1.0)]  # 0.148721, 0.106531, 0, 0.718282, 0.367879
    assert all(k > 0 for i, k in enumerate(k3) if i != 2)
    assert metrics["kl"] == pytest.approx(sum(k3) / 5, abs=1e-6)
    assert loss.item() == pytest.approx(loss0.item() + beta * sum(k3) / 5, abs=1e-6)
    # d(β·k3)/d logp = β·(1 - exp(ref - logp)) / N, added to the policy gradient of the first test
    policy = [[0.0, -0.7 / 5, -1.0 / 5], [0.0, 2.6 / 5, 0.0]]
    expected = [[p + beta * (1 - math.exp(x)) / 5 for p, x in zip(prow, drow)]
                for prow, drow in zip(policy, d.tolist())]
    expected[1][2] = 0.0
    loss.backward()
    assert logp.grad.tolist() == [pytest.approx(row, abs=1e-6) for row in expected]

    # measured but not in the loss when β = 0
    loss_b0, metrics_b0 = grpo_loss(logp, old, adv, mask, clip_eps=0.2, ref_logprobs=ref)
    assert loss_b0.item() == pytest.approx(loss0.item()) and metrics_b0["kl"] == pytest.approx(metrics["kl"])


def test_k3_never_negative_for_tiny_differences():
    # in fp32, exp(d) - d - 1 is -6e-8 for d = 1e-6 and for d = 5e-8; expm1(d) - d is not
    logp = torch.zeros(1, 4)
    ref = logp + torch.tensor([[1e-6, 5e-8, -3e-7, 1e-8]])
    _, metrics = grpo_loss(logp, logp, torch.zeros(1), torch.ones(1, 4, dtype=torch.bool), kl_beta=1.0,
                           ref_logprobs=ref)
    assert metrics["kl"] >= 0.0


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_masked_tokens_change_neither_loss_nor_gradient(aggregation):
    results = []
    for garbage in (0.0, -5.0, float("-inf"), float("nan")):
        logp, old, adv, mask = example(masked_logprob=garbage)
        old[1, 2] = -garbage
        ref = logp.detach() + 0.3
        ref[1, 2] = garbage
        per_token_adv = adv[:, None].expand(2, 3).clone()
        per_token_adv[1, 2] = garbage
        loss, metrics = grpo_loss(logp, old, per_token_adv, mask, clip_eps=0.2, kl_beta=0.1, ref_logprobs=ref,
                                  aggregation=aggregation)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
        results.append((loss.item(), logp.grad.tolist(), metrics))
    assert all(r == results[0] for r in results[1:])
    assert results[0][1][1][2] == 0.0


def test_sequence_mean_weighs_sequences_not_tokens_and_skips_empty_ones():
    logp = torch.zeros(3, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    adv = torch.tensor([1.0, -1.0, 7.0])
    # ratio 1: sequence means -1 and +1 -> 0 (sequence 2 has no tokens); token-level: (-4 + 1) / 5 = -0.6
    seq, _ = grpo_loss(logp, logp, adv, mask, aggregation="sequence")
    tok, _ = grpo_loss(logp, logp, adv, mask, aggregation="token")
    assert seq.item() == pytest.approx(0.0) and tok.item() == pytest.approx(-0.6)
    # a given denominator replaces the count: the sum over micro-batches of loss(part, N_total) is the whole loss
    halves = [grpo_loss(logp[i : i + 2], logp[i : i + 2], adv[i : i + 2], mask[i : i + 2], denominator=5)[0]
              for i in (0, 2)]
    assert sum(h.item() for h in halves) == pytest.approx(-0.6)
    empty, metrics = grpo_loss(logp, logp, adv, torch.zeros(3, 4, dtype=torch.bool))
    assert empty.item() == 0.0 and metrics["clip_fraction"] == 0.0


def test_loss_rejects_misuse():
    logp, old, adv, mask = example()
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(logp, old, adv, mask, kl_beta=0.1)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(logp, old, adv, mask, aggregation="mean")
    with pytest.raises(ValueError, match="clip_eps"):
        grpo_loss(logp, old, adv, mask, clip_eps=(1.0, 0.2))
    with pytest.raises(ValueError, match="one shape"):
        grpo_loss(logp, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, old, torch.zeros(3), mask)


# ---- entropy and log-probabilities ---------------------------------------------------------------------------


def test_entropy_uniform_peaked_and_masked():
    V = 11
    uniform = torch.zeros(2, 3, V)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert token_entropy(uniform, mask).item() == pytest.approx(math.log(V), abs=1e-6)
    peaked = torch.full((2, 3, V), -1e4)
    peaked[..., 3] = 1e4
    assert token_entropy(peaked, mask).item() == pytest.approx(0.0, abs=1e-6)
    # masked positions are not read: make them peaked (or NaN) and the uniform ones still give log V
    mixed = uniform.clone()
    mixed[0, 2] = peaked[0, 2]
    mixed[1, 1:] = float("nan")
    assert token_entropy(mixed, mask).item() == pytest.approx(math.log(V), abs=1e-6)
    # a -inf logit (a banned token) is a zero-probability entry, not NaN: uniform over V - 1 tokens
    banned = uniform.clone()
    banned[..., 0] = float("-inf")
    assert token_entropy(banned, mask).item() == pytest.approx(math.log(V - 1), abs=1e-6)
    assert token_entropy(uniform, torch.zeros_like(mask)).item() == 0.0


def test_entropy_two_point_distribution_and_blocks(monkeypatch):
    # p = (0.75, 0.25): H = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335
    logits = torch.tensor([math.log(3.0), 0.0]).expand(4, 5, 2).contiguous()
    mask = torch.ones(4, 5, dtype=torch.bool)
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert token_entropy(logits, mask).item() == pytest.approx(expected, abs=1e-6)
    monkeypatch.setattr("zili.train.grpo.CPU_BLOCK_ELEMENTS", 6)  # 3 rows a block: 20 rows in 7 blocks
    assert token_entropy(logits, mask).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_logprobs_equals_log_softmax_gather(dtype, monkeypatch):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 17, generator=g) * 4).to(dtype)
    tokens = torch.randint(0, 17, (3, 5), generator=g)
    expected = torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    got = gather_logprobs(logits, tokens)
    assert got.dtype == torch.float32 and got.shape == (3, 5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    monkeypatch.setattr("zili.train.grpo.CPU_BLOCK_ELEMENTS", 40)  # 2 rows a block
    torch.testing.assert_close(gather_logprobs(logits, tokens), expected, rtol=0, atol=1e-5)
    # stable where a naive softmax overflows
    huge = torch.tensor([[[1000.0, 0.0, -1000.0]]])
    assert gather_logprobs(huge, torch.tensor([[1]])).item() == pytest.approx(-1000.0)


def test_gather_logprobs_gradient_matches_log_softmax():
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(1))
    tokens = torch.tensor([[0, 6, 3], [2, 2, 5]])
    a = logits.clone().requires_grad_()
    gather_logprobs(a, tokens).sum().backward()
    b = logits.clone().requires_grad_()
    torch.log_softmax(b, -1).gather(-1, tokens[..., None]).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_logprobs_and_entropy_at_a_temperature_are_those_of_the_sampled_distribution(monkeypatch):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 9, generator=g) * 3
    tokens = torch.randint(0, 9, (2, 4), generator=g)
    mask = torch.ones(2, 4, dtype=torch.bool)
    for t in (0.5, 0.7, 2.0):
        tempered = torch.log_softmax(logits / t, -1)
        expected = tempered.gather(-1, tokens[..., None]).squeeze(-1)
        torch.testing.assert_close(gather_logprobs(logits, tokens, t), expected, rtol=0, atol=1e-5)
        assert not torch.allclose(gather_logprobs(logits, tokens), expected)  # T = 1 is another policy
        entropy = -(tempered.exp() * tempered).sum(-1).mean()
        assert token_entropy(logits, mask, t).item() == pytest.approx(entropy.item(), abs=1e-5)
    monkeypatch.setattr("zili.train.grpo.CPU_BLOCK_ELEMENTS", 18)  # 2 rows a block
    torch.testing.assert_close(gather_logprobs(logits, tokens, 0.7),
                               torch.log_softmax(logits / 0.7, -1).gather(-1, tokens[..., None]).squeeze(-1),
                               rtol=0, atol=1e-5)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            gather_logprobs(logits, tokens, bad)


def test_the_rl_trainer_scores_rollouts_at_their_sampling_temperature():
    import contextlib
    from types import SimpleNamespace

    from zili.train.rl import RLTrainer

    logits = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(3))
    tokens = torch.tensor([[4, 0, 2]])
    for sampled, scored in ((0.7, 0.7), (1.3, 1.3), (0.0, 1.0)):  # greedy rollouts (T = 0): plain logits
        trainer = SimpleNamespace(cfg=SimpleNamespace(rl=SimpleNamespace(temperature=sampled)),
                                  autocast=contextlib.nullcontext)
        trainer.temperature = RLTrainer.temperature.fget(trainer)
        assert trainer.temperature == scored
        got = RLTrainer._logprobs(trainer, lambda inputs: logits, None, tokens)
        torch.testing.assert_close(got, torch.log_softmax(logits / scored, -1).gather(-1, tokens[..., None])
                                   .squeeze(-1), rtol=0, atol=1e-5)
