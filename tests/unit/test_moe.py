"""The mixture-of-experts feed-forward (zili.models.moe) against a per-token, per-expert reference written from
the routing rules of Qwen3-MoE (softmax top-k) and DeepSeek-V3 (sigmoid, group-limited, bias-corrected choice):
the same experts, weights, outputs and gradients; one grouped multiply per projection whatever the expert count;
the balancing bias moves towards the mean load; impossible routing shapes are one-line errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from zili.errors import UserError
from zili.models import moe
from zili.models.args import ModelArgs
from zili.models.transformer import SwiGLU

BASE = ModelArgs(n_layers=2, dim=16, n_heads=2, n_kv_heads=2, ffn_dim=32, vocab_size=64, max_seq_len=16,
                 n_routed_experts=8, top_k=2, moe_ffn_dim=12)
SOFTMAX = dataclasses.replace(BASE, norm_topk_prob=False)
SIGMOID = dataclasses.replace(BASE, score_func="sigmoid", n_group=4, topk_group=2, top_k=3, n_shared_experts=1,
                              routed_scaling_factor=2.5)


def build(args: ModelArgs, seed: int = 0) -> moe.MoE:
    torch.manual_seed(seed)
    shared = SwiGLU(args.dim, args.n_shared_experts * args.moe_ffn_dim) if args.n_shared_experts else None
    layer = moe.MoE(args, shared)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if args.score_func == "sigmoid":
            layer.gate.e_score_correction_bias.copy_(torch.randn(args.n_routed_experts) * 0.1)
    return layer


def reference_route(args: ModelArgs, logits_row: torch.Tensor, bias: torch.Tensor) -> dict[int, float]:
    """{expert: weight (0-dim tensor, differentiable)} for one token, rule by rule."""
    if args.score_func == "softmax":
        scores = logits_row.softmax(-1)
        chosen = sorted(range(len(scores)), key=lambda e: -float(scores[e].detach()))[: args.top_k]
    else:
        scores = logits_row.sigmoid()
        biased = (scores + bias).tolist()
        size = args.n_routed_experts // args.n_group
        groups = [sorted(biased[g * size:(g + 1) * size], reverse=True) for g in range(args.n_group)]
        best = sorted(range(args.n_group), key=lambda g: -sum(groups[g][:2]))[: args.topk_group]
        eligible = [e for e in range(args.n_routed_experts) if e // size in best]
        chosen = sorted(eligible, key=lambda e: -biased[e])[: args.top_k]
    weights = {e: scores[e] for e in chosen}
    if args.norm_topk_prob:
        total = sum(weights.values())
        weights = {e: w / total for e, w in weights.items()}
    return {e: w * args.routed_scaling_factor for e, w in weights.items()}


def reference_forward(layer: moe.MoE, x: torch.Tensor) -> torch.Tensor:
    args, flat = layer.args, x.reshape(-1, x.shape[-1])
    logits = F.linear(flat, layer.gate.weight)
    rows = []
    for t in range(len(flat)):
        out = torch.zeros(args.dim)
        for e, w in reference_route(args, logits[t], layer.gate.e_score_correction_bias).items():
            ex = layer.experts
            h = F.silu(flat[t] @ ex.w_gate[e].T) * (flat[t] @ ex.w_up[e].T)
            out = out + w * (h @ ex.w_down[e].T)
        if layer.shared_experts is not None:
            out = out + layer.shared_experts(flat[t])
        rows.append(out)
    return torch.stack(rows).reshape(x.shape)


@pytest.mark.parametrize("args", [SOFTMAX, BASE, SIGMOID], ids=["softmax", "softmax-normalised", "sigmoid-groups"])
def test_routing_picks_the_reference_experts_and_weights(args):
    layer = build(args)
    x = torch.randn(40, args.dim)
    weights, indices, _ = layer.gate(x)
    logits = F.linear(x, layer.gate.weight)
    for t in range(len(x)):
        want = reference_route(args, logits[t], layer.gate.e_score_correction_bias)
        got = dict(zip(indices[t].tolist(), weights[t].tolist()))
        assert got.keys() == want.keys()
        assert all(abs(got[e] - float(want[e].detach())) < 1e-5 for e in want)


@pytest.mark.parametrize("args", [SOFTMAX, SIGMOID], ids=["softmax", "sigmoid-groups-shared"])
def test_forward_and_gradients_equal_the_per_token_reference(args):
    layer = build(args)
    x = torch.randn(3, 5, args.dim, requires_grad=True)
    got = layer(x)
    want = reference_forward(layer, x)
    assert torch.allclose(got, want, atol=1e-5)
    grad = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, [x, *layer.parameters()], grad)
    want_grads = torch.autograd.grad(want, [x, *layer.parameters()], grad)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-5)


@pytest.mark.parametrize("experts", [4, 32])
def test_one_grouped_multiply_per_projection_whatever_the_expert_count(monkeypatch, experts):
    calls = []
    real = moe.grouped_mm
    monkeypatch.setattr(moe, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = build(dataclasses.replace(SOFTMAX, n_routed_experts=experts))
    layer(torch.randn(2, 8, SOFTMAX.dim))
    assert len(calls) == 3  # gate, up, down: no Python loop over experts


def test_balancing_bias_moves_towards_the_mean_load_and_counts_training_tokens_only():
    layer = build(SIGMOID)
    before = layer.gate.e_score_correction_bias.clone()
    layer.eval()
    layer(torch.randn(4, 8, SIGMOID.dim))
    assert layer.tokens_per_expert.sum() == 0
    layer.train()
    layer(torch.randn(4, 8, SIGMOID.dim))
    load = layer.tokens_per_expert.clone()
    assert load.sum() == 4 * 8 * SIGMOID.top_k
    assert float(layer.load_imbalance()) == pytest.approx(float(load.max() / load.mean()))
    layer.update_bias(0.01)
    moved = layer.gate.e_score_correction_bias - before
    assert torch.allclose(moved, 0.01 * torch.sign(load.mean() - load))
    assert layer.tokens_per_expert.sum() == 0


@pytest.mark.parametrize("change,message", [
    ({"top_k": 9}, "top_k"),
    ({"n_group": 3}, "n_group"),
    ({"n_group": 2, "topk_group": 3}, "topk_group"),
    ({"n_group": 4, "topk_group": 1, "top_k": 3}, "top_k"),
    ({"score_func": "relu"}, "score_func"),
])
def test_impossible_routing_is_one_line_error(change, message):
    with pytest.raises(UserError, match=message):
        dataclasses.replace(BASE, **change).validate()


def test_sequence_balance_loss_is_one_when_even_and_trains_the_router():
    n_experts, tokens = 4, 8  # top 2
    even = torch.full((tokens, n_experts), 0.5)  # equal scores, every expert chosen equally often
    indices = torch.tensor([[0, 1], [2, 3]] * (tokens // 2))
    assert float(moe.sequence_balance_loss(even, indices, (1, tokens, 16))) == pytest.approx(1.0)
    skewed = torch.tensor([[0.9, 0.8, 0.1, 0.1]] * tokens)
    lopsided = torch.tensor([[0, 1]] * tokens)  # every token to experts 0 and 1
    assert float(moe.sequence_balance_loss(skewed, lopsided, (1, tokens, 16))) > 1.5
    # in a training forward the layer leaves coef x the loss; its gradient reaches the router only
    layer = build(SIGMOID)
    layer.aux_loss_coef = 0.01
    layer(torch.randn(2, 8, SIGMOID.dim))
    assert layer.aux_loss is not None and layer.aux_loss.item() > 0
    layer.aux_loss.backward()
    assert layer.gate.weight.grad.abs().sum() > 0 and layer.experts.w_up.grad is None


def test_train_step_adds_the_balance_loss_to_the_objective_not_to_the_reported_loss():
    import contextlib

    from tests.unit.test_mla import MLA
    from tests.unit.test_mtp import OnePart
    from zili.models.transformer import Transformer
    from zili.train.step import forward_backward

    tokens = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(0))
    results = []
    for coef in (0.0, 0.5):
        model = Transformer(MLA)
        model.init_weights(0)
        for layer in model.expert_layers():
            layer.aux_loss_coef = coef
        loss, _ = forward_backward(OnePart(model), tokens[:, :-1], tokens[:, 1:], micro_batch=2,
                                   autocast=contextlib.nullcontext)
        results.append((loss, model.blocks["1"].mlp.gate.weight.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert not torch.allclose(results[0][1], results[1][1])
