"""Sampling (zili.infer.generate): `stream` yields what `generate` returns, `sample_group`'s n rows of one cache
give what each would give alone (greedy), end at their own stop token, and repeat with the same generator."""

import torch

from zili.infer.generate import generate, pick, sample_group, stream
from zili.models.args import ModelArgs
from zili.models.transformer import Transformer

ARGS = ModelArgs(n_layers=2, dim=48, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=37, max_seq_len=64)


def model():
    m = Transformer(ARGS)
    m.init_weights(5)
    return m.eval()


def test_stream_yields_the_generated_tokens_and_stops_after_a_stop_id():
    m = model()
    prompt = [3, 1, 4, 1, 5]
    full = generate(m, prompt, 12, temperature=0.9, top_p=0.9, seed=7)
    assert list(stream(m, prompt, 12, temperature=0.9, top_p=0.9, seed=7)) == full
    stop = full[4]
    cut = generate(m, prompt, 12, temperature=0.9, top_p=0.9, seed=7, stop_ids=[stop])
    assert cut == full[: full.index(stop) + 1]  # the stop token is the last one returned


def test_a_group_of_rows_samples_like_one_row_each():
    m = model()
    prompt = [2, 7, 1, 8]
    greedy = generate(m, prompt, 10)
    rows = sample_group(m, prompt, 3, 10, temperature=0.0, top_p=1.0, generator=torch.Generator().manual_seed(0))
    assert rows == [greedy] * 3
    # a stop id ends each row where its own completion first has it
    stop = greedy[3]
    rows = sample_group(m, prompt, 2, 10, 0.0, 1.0, torch.Generator().manual_seed(0), stop_ids=[stop])
    assert rows == [greedy[: greedy.index(stop) + 1]] * 2
    # sampled: rows differ, and the same generator seed gives the same rows
    a = sample_group(m, prompt, 4, 10, 1.0, 1.0, torch.Generator().manual_seed(3))
    b = sample_group(m, prompt, 4, 10, 1.0, 1.0, torch.Generator().manual_seed(3))
    assert a == b and len({tuple(r) for r in a}) > 1


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(pick(logits, 1.0, 0.7, torch.Generator().manual_seed(s))[0]) for s in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are never drawn
    assert int(pick(logits, 0.0, 1.0, torch.Generator())[0]) == 0
