"""Model: preset sizes, meta construction, causal masking, KV-cache decoding, argument checks."""

import pytest
import torch

from zili.errors import UserError
from zili.infer.generate import generate
from zili.models.args import ModelArgs
from zili.models.flops import flops_per_token, matmul_params, param_counts
from zili.models.presets import PRESETS, get_preset
from zili.models.rope import rope_frequencies
from zili.models.transformer import KVCache, Transformer

PUBLISHED = {  # parameters of the released checkpoints
    "qwen2-0.5b": 0.494e9, "qwen2-1.5b": 1.544e9, "qwen2-7b": 7.616e9, "qwen2-72b": 72.71e9,
    "llama3-8b": 8.030e9, "llama3-70b": 70.55e9, "llama3-405b": 405.85e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts_match_published(name):
    with torch.device("meta"):
        model = Transformer(get_preset(name))
    counted = sum(p.numel() for p in model.parameters())
    assert counted == param_counts(model.args)["total"]
    assert abs(counted / PUBLISHED[name] - 1) < 1e-3


def test_exact_qwen2_0_5b_count():
    assert param_counts(PRESETS["qwen2-0.5b"])["total"] == 494_032_768


def test_large_preset_builds_on_meta_without_memory():
    with torch.device("meta"):
        model = Transformer(get_preset("llama3-405b"))
    assert all(p.is_meta for p in model.parameters())


def small_args(**kw):
    base = dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=101, max_seq_len=64,
                qkv_bias=True)
    return ModelArgs(**{**base, **kw})


def build(args, seed=0):
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights(seed)
    return model.eval()


def test_causal_future_tokens_do_not_change_past_logits():
    model = build(small_args())
    x = torch.randint(0, 101, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 101, (2, 8))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_kv_cache_prefill_and_decode_match_full_forward():
    model = build(small_args())
    x = torch.randint(0, 101, (1, 16))
    cache = KVCache(model.args, 1, 16, "cpu", torch.float32)
    with torch.no_grad():
        full = model(x)
        first = model(x[:, :9], start_pos=0, cache=cache)
        chunk = model(x[:, 9:13], start_pos=9, cache=cache)  # several new tokens at once
        rest = [model(x[:, i:i + 1], start_pos=i, cache=cache) for i in range(13, 16)]
    stepped = torch.cat([first, chunk, *rest], dim=1)
    assert torch.allclose(stepped, full, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_kv_cache_generation_equals_recomputation(tied):
    model = build(small_args(tied_embeddings=tied, rope_scaling="llama3", rope_original_max_len=16))
    prompt = [5, 17, 3, 99, 42]
    for temperature in (0.0, 0.9):
        cached = generate(model, prompt, 30, temperature=temperature, top_p=0.9, seed=3)
        recomputed = generate(model, prompt, 30, temperature=temperature, top_p=0.9, seed=3, use_cache=False)
        assert cached == recomputed and len(cached) == 30


def test_greedy_generation_is_deterministic_and_seeded_sampling_varies():
    model = build(small_args())
    assert generate(model, [1, 2, 3], 20) == generate(model, [1, 2, 3], 20)
    samples = {tuple(generate(model, [1, 2, 3], 20, temperature=1.5, seed=s)) for s in range(4)}
    assert len(samples) > 1


def test_generation_stops_at_eos_and_max_len():
    model = build(small_args(max_seq_len=12))
    assert len(generate(model, [1, 2, 3], 100)) == 9
    out = generate(model, [1, 2, 3], 5)
    assert generate(model, [1, 2, 3], 100, eos_id=out[1])[-1] == out[1]


def test_tied_embeddings_share_one_matrix():
    tied, untied = Transformer(small_args(tied_embeddings=True)), Transformer(small_args())
    n_tied = sum(p.numel() for p in tied.parameters())
    assert n_tied == param_counts(tied.args)["total"]
    assert sum(p.numel() for p in untied.parameters()) - n_tied == 101 * 64
    assert tied.lm_head is None


def test_meta_then_materialise_is_deterministic():
    args = small_args()
    with torch.device("meta"):
        a, b = Transformer(args), Transformer(args)
    for m in (a, b):
        m.to_empty(device="cpu")
        m.init_weights(seed=7)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    assert torch.equal(a.rope, Transformer(args).rope)


def test_llama3_rope_scaling_keeps_high_and_divides_low_frequencies():
    args = small_args(rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=64, rope_theta=10000.0)
    plain = rope_frequencies(small_args(rope_theta=10000.0))
    scaled = rope_frequencies(args)
    assert torch.allclose(scaled[0], plain[0])  # shortest wavelength untouched
    assert torch.allclose(scaled[-1], plain[-1] / 8)  # longest wavelength stretched by the factor


def test_bad_head_layout_is_a_user_error():
    with pytest.raises(UserError, match="divisible by model.n_kv_heads"):
        small_args(n_heads=4, n_kv_heads=3).validate()
    with pytest.raises(UserError, match="divisible by model.n_heads"):
        small_args(dim=66).validate()


def test_flops_per_token_formula():
    args = small_args()
    hd = 16
    per_layer = 64 * 4 * hd * 2 + 64 * 2 * hd * 2 + 3 * 64 * 96
    assert matmul_params(args) == 2 * per_layer + 101 * 64
    assert flops_per_token(args, 32) == 6 * matmul_params(args) + 12 * 2 * 4 * hd * 32
