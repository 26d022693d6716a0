"""Transforms applied from outside: activation checkpointing keeps names and gradients."""

import copy

import torch

from zili.models.args import ModelArgs
from zili.models.transformer import Transformer
from zili.parallel.apply import apply_activation_checkpointing
from zili.train.step import lm_loss


def test_activation_checkpointing_same_gradients_and_names():
    args = ModelArgs(n_layers=3, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=60, max_seq_len=16)
    torch.manual_seed(0)
    plain = Transformer(args)
    plain.init_weights(0)
    wrapped = copy.deepcopy(plain)
    apply_activation_checkpointing(wrapped)
    assert list(plain.state_dict()) == list(wrapped.state_dict())
    assert all("checkpoint" in type(b).__name__.lower() for b in wrapped.blocks.values())
    x = torch.randint(0, 60, (2, 12))
    for model in (plain, wrapped):
        lm_loss(model(x[:, :-1]), x[:, 1:]).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), wrapped.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
