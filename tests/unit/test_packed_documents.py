"""Packed documents (zili.models.positions.Documents): several documents in one row of the batch get the logits
each has alone — positions restart per document and no attention crosses a document boundary — for grouped-query
attention, Qwen3's q/k norm, and multi-head latent attention with experts."""

import pytest
import torch

from zili.models.args import ModelArgs
from zili.models.positions import document_positions
from zili.models.transformer import Transformer

GQA = ModelArgs(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=101, max_seq_len=64)
QWEN3 = ModelArgs(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=101, max_seq_len=64,
                  head_size=24, qk_norm=True)
MLA = ModelArgs(n_layers=2, dim=64, n_heads=4, n_kv_heads=4, ffn_dim=96, vocab_size=101, max_seq_len=64,
                attention="mla", q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8,
                v_head_dim=10, n_routed_experts=4, n_shared_experts=1, top_k=2, moe_ffn_dim=16, n_dense_layers=1,
                score_func="softmax")


def test_positions_restart_and_the_mask_keeps_documents_apart():
    docs = document_positions(torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]]))
    assert docs.positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    assert docs.end == 6
    mask = docs.mask[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False]  # its own document, up to itself
    assert mask[5].tolist() == [False] * 5 + [True]
    assert torch.equal(docs.mask[1, 0], torch.ones(6, 6, dtype=torch.bool).tril())  # one document: causal


@pytest.mark.parametrize("args", [GQA, QWEN3, MLA], ids=["gqa", "qwen3-qk-norm", "mla-moe"])
def test_a_packed_row_gives_each_document_its_logits_alone(args):
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights(3)
    model.eval()
    lengths = [5, 9, 3, 7]
    pieces = [torch.randint(0, args.vocab_size, (n,)) for n in lengths]
    # two rows of 15: documents 0-1 then a filler of 1 token; documents 2-3 then a filler of 5
    fillers = [torch.randint(0, args.vocab_size, (n,)) for n in (1, 5)]
    rows = torch.stack([torch.cat([pieces[0], pieces[1], fillers[0]]), torch.cat([pieces[2], pieces[3], fillers[1]])])
    ids = torch.tensor([[0] * 5 + [1] * 9 + [2], [7] * 3 + [8] * 7 + [9] * 5])  # any ids: a change starts one
    with torch.no_grad():
        packed = model(rows, documents=ids)
        alone = [model(p[None])[0] for p in pieces]
    torch.testing.assert_close(packed[0, :5], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[0, 5:14], alone[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[1, :3], alone[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[1, 3:10], alone[3], rtol=1e-5, atol=1e-5)
    # without the documents the second document of a row sees the first: its logits differ
    with torch.no_grad():
        plain = model(rows)
    assert not torch.allclose(plain[0, 5:14], alone[1], atol=1e-3)


def test_documents_refused_with_a_cache_or_spans():
    model = Transformer(GQA)
    model.init_weights(0)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="cannot be combined"):
        model(tokens, documents=torch.zeros(1, 4, dtype=torch.long), positions=(range(0, 4),))
    with pytest.raises(ValueError, match="cannot be combined"):
        model(tokens, documents=torch.zeros(1, 4, dtype=torch.long), cache=model.new_cache(1, 8, "cpu",
                                                                                            torch.float32))
