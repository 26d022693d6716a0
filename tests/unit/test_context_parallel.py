"""Context parallelism's bookkeeping, in one process: the load-balanced chunks, RoPE at explicit positions, the
gathered keys put back in position order, and causal attention by position reproduce the one-process model's
outputs at every rank's positions — the all-gather replaced by the keys the other ranks would send."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from zili import kernels
from zili.models.args import ModelArgs
from zili.models.positions import KeyContext, causal_attention, position_tensor
from zili.models.transformer import Transformer
from zili.parallel import context_parallel
from zili.parallel.context_parallel import GatheredKeys, load_balanced_spans, split_sequence

GQA = ModelArgs(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=101, max_seq_len=64,
                qk_norm=True)
MLA = ModelArgs(n_layers=2, dim=64, n_heads=4, n_kv_heads=4, ffn_dim=96, vocab_size=101, max_seq_len=64,
                attention="mla", q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8,
                v_head_dim=10, rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=16, rope_mscale=1.0,
                rope_mscale_all_dim=1.0)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_load_balanced_spans_cover_the_sequence_once_with_equal_causal_work(cp):
    T = 8 * cp
    spans = [load_balanced_spans(T, cp, rank) for rank in range(cp)]
    assert sorted(p for rank in spans for s in rank for p in s) == list(range(T))
    assert spans[0][0] == range(0, 4) and spans[0][1] == range(T - 4, T)  # the first and the last chunk
    work = {sum(s.stop for s in rank) for rank in spans}  # keys seen by a chunk's queries grow with its end
    assert len(work) == 1
    with pytest.raises(ValueError, match="2\\*cp"):
        load_balanced_spans(T + cp, cp, 0)


class Recorder(KeyContext):
    """The default key context, keeping what passes through it (the one-process keys, layer by layer)."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def forward(self, spans, *tensors):
        self.seen.extend(t.detach() for t in tensors)
        return super().forward(spans, *tensors)


@pytest.mark.parametrize("args", [GQA, MLA], ids=["gqa-qk-norm", "mla-yarn"])
@pytest.mark.parametrize("cp", [2, 4])
def test_every_cp_rank_reproduces_the_one_process_model_at_its_positions(monkeypatch, args, cp):
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights(seed=1)
    tokens = torch.randint(0, args.vocab_size, (2, 32))
    with torch.no_grad():
        whole = model(tokens)
        seen = []
        for block in model.blocks.values():
            block.attn.key_context = Recorder(seen)
        # one span from 0 is the plain causal call: bit for bit the model without positions
        assert torch.equal(model(tokens, positions=(range(0, 32),)), whole)

        for rank in range(cp):
            spans = load_balanced_spans(32, cp, rank)
            calls = iter(seen)

            def gather(t, dim, group, spans=spans, calls=calls):
                """What the all-gather would return: every rank's chunks of the one-process keys, in rank order —
                after checking that this rank computed its own chunks of them (RoPE at the true positions)."""
                full = next(calls)
                assert dim == t.ndim - 2 and group is None
                torch.testing.assert_close(t, split_sequence(full.movedim(-2, 1), spans).movedim(1, -2))
                return torch.cat([split_sequence(full.movedim(-2, 1), load_balanced_spans(32, cp, r)).movedim(1, -2)
                                  for r in range(cp)], dim=dim)

            monkeypatch.setattr(context_parallel, "all_gather_autograd", gather)
            for block in model.blocks.values():
                block.attn.key_context = GatheredKeys(None, cp, rank)
            local = model(split_sequence(tokens, spans), positions=spans)
            torch.testing.assert_close(local, split_sequence(whole, spans), rtol=1e-5, atol=1e-5)
            assert next(calls, None) is None  # every layer's keys were gathered, nothing else


def test_gathered_keys_refuse_positions_other_than_the_ranks_chunks():
    with pytest.raises(ValueError, match="load-balanced"):
        GatheredKeys(None, 2, 1)((range(0, 8),), torch.zeros(1, 8, 4))


@pytest.mark.parametrize("grad", [False, True], ids=["sdpa", "cpu-matmul"])
def test_causal_attention_of_a_chunk_against_all_earlier_keys_is_bottom_right_aligned(grad):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 24, 16), torch.randn(2, 2, 24, 16), torch.randn(2, 2, 24, 8)
    mask = torch.ones(24, 24, dtype=torch.bool).tril()
    reference = kernels.sdpa_attention(q, k, v, mask, causal=False)
    with torch.set_grad_enabled(grad):
        last = kernels.attention(q[:, :, 16:], k, v)  # queries at positions 16..23 of keys 0..23
    torch.testing.assert_close(last, reference[:, :, 16:], rtol=1e-5, atol=1e-5)


def test_causal_attention_by_position_masks_keys_in_any_order():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    q_spans, k_spans = (range(0, 4), range(8, 12)), (range(4, 12), range(0, 4))  # keys not in position order
    order = position_tensor(k_spans).argsort()
    full = kernels.sdpa_attention(q.new_zeros(1, 2, 12, 8).index_copy(2, position_tensor(q_spans), q),
                                  k[:, :, order], v[:, :, order], torch.ones(12, 12, dtype=torch.bool).tril(),
                                  causal=False)
    ours = causal_attention(q, k, v, q_spans, k_spans)
    torch.testing.assert_close(ours, full[:, :, position_tensor(q_spans)], rtol=1e-5, atol=1e-5)


def test_positions_are_refused_with_a_cache_or_when_they_do_not_fit():
    model = Transformer(dataclasses.replace(GQA, n_layers=1))
    tokens = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="hold 6 positions for 8 columns"):
        model(tokens, positions=(range(0, 6),))
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        model(tokens, positions=(range(60, 68),))
    with pytest.raises(ValueError, match="generation cache"):
        model(tokens, positions=(range(0, 8),), cache=model.new_cache(1, 8, "cpu", torch.float32))
