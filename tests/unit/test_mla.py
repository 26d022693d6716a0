"""Multi-head latent attention and Qwen3's q/k norm in zili's own model: the latent cache gives the full forward's
logits and generation, it holds only the latent and the rotated key, its size per token, the attention kernel's
value head size and scale, and impossible shapes refused in one line."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from zili import cpu, kernels
from zili.errors import UserError
from zili.infer.generate import generate
from zili.models.args import ModelArgs
from zili.models.mla import LatentCache
from zili.models.presets import get_preset
from zili.models.transformer import KVCache, Transformer

MLA = ModelArgs(n_layers=3, dim=64, n_heads=4, n_kv_heads=4, ffn_dim=96, vocab_size=101, max_seq_len=64,
                attention="mla", q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8,
                v_head_dim=10, rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=16, rope_mscale=1.0,
                rope_mscale_all_dim=1.0, n_routed_experts=8, n_shared_experts=1, top_k=2, moe_ffn_dim=16,
                n_dense_layers=1, score_func="sigmoid", n_group=2, topk_group=1)
QWEN3 = ModelArgs(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=101, max_seq_len=64,
                  head_size=24, qk_norm=True)


def build(args, seed=0):
    model = Transformer(args)
    model.init_weights(seed)
    with torch.no_grad():  # norms off their init value of 1, so that a missing norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    return model.eval()


@pytest.mark.parametrize("args", [MLA, dataclasses.replace(MLA, q_lora_rank=0), QWEN3],
                         ids=["mla-q-lora", "mla-plain-q", "qwen3-qk-norm"])
def test_cache_prefill_and_decode_match_the_full_forward(args):
    model = build(args)
    x = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(2, 40, "cpu", torch.float32)
    assert isinstance(cache, LatentCache if args.is_mla else KVCache)
    with torch.no_grad():
        full = model(x)
        first = model(x[:, :25], start_pos=0, cache=cache)  # past rope_original_max_len: YaRN at work
        chunk = model(x[:, 25:31], start_pos=25, cache=cache)
        rest = [model(x[:, i:i + 1], start_pos=i, cache=cache) for i in range(31, 40)]
    torch.testing.assert_close(torch.cat([first, chunk, *rest], dim=1), full, atol=1e-5, rtol=1e-5)


def test_mla_generation_with_the_latent_cache_equals_recomputation():
    model = build(MLA)
    for temperature in (0.0, 0.9):
        cached = generate(model, [5, 17, 3, 99, 42], 14, temperature=temperature, top_p=0.9, seed=3)
        assert cached == generate(model, [5, 17, 3, 99, 42], 14, temperature=temperature, top_p=0.9, seed=3,
                                  use_cache=False)  # up to position 19: past rope_original_max_len


def test_latent_cache_holds_the_latent_and_the_rotated_key_only():
    cache = Transformer(MLA).new_cache(2, 40, "cpu", torch.bfloat16)
    assert [t.shape for t in cache.latent] == [torch.Size([2, 40, 16])] * 3
    assert [t.shape for t in cache.k_rope] == [torch.Size([2, 1, 40, 8])] * 3
    stored = sum(t.numel() * t.element_size() for t in cache.latent + cache.k_rope)
    assert stored == 2 * 40 * LatentCache.bytes_per_token(MLA)


def test_deepseek_v3_cache_bytes_per_token_as_docs_state():
    v3 = get_preset("deepseek-v3")
    assert LatentCache.bytes_per_token(v3) == 61 * (512 + 64) * 2 == 70_272
    gqa8 = dataclasses.replace(v3, attention="gqa", n_kv_heads=8, head_size=128)  # an 8-KV-head GQA of 128
    assert KVCache.bytes_per_token(gqa8) == 61 * 2 * 8 * 128 * 2 == 249_856


def test_cpu_matmul_attention_takes_a_value_head_size_and_scale_of_its_own():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 4, 40, 20, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 4, 40, 12, generator=g, requires_grad=True)
    ours = cpu.causal_attention(q, k, v, block=16, scale=0.3)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernels.attention(q, k, v, scale=0.3), want, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    for got, expected in zip(grads, torch.autograd.grad(want.square().sum(), (q, k, v))):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("change, message", [
    (dict(kv_lora_rank=0), "needs positive kv_lora_rank"),
    (dict(qk_rope_head_dim=7), "must be even for RoPE"),
    (dict(n_kv_heads=2), "set model.n_kv_heads = model.n_heads"),
    (dict(qk_norm=True), "belong to grouped-query attention"),
    (dict(attention="mqa"), "must be 'gqa' or 'mla'"),
    (dict(rope_factor=0.5), "YaRN needs rope_factor >= 1"),
])
def test_mla_shapes_that_do_not_fit_are_refused(change, message):
    with pytest.raises(UserError, match=message):
        dataclasses.replace(MLA, **change).validate()


def test_mla_dims_that_do_not_fit_are_one_line_exit_2(zili_cli, tmp_path):
    proc = zili_cli("train", "--model.preset=tiny-moe", "--model.attention=mla", "--model.kv_lora_rank=32",
                    f"--training.run_dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "multi-head latent attention needs positive" in proc.stderr
