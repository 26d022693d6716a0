"""The performance paths compute the textbook model: CPU matmul attention, the blockwise cross-entropy,
the autocast cast in RMSNorm and the compiled blocks all give the plain results (fp32 within 1e-5)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from zili import cpu
from zili.cpu import causal_attention
from zili.infer.generate import generate
from zili.models.args import ModelArgs
from zili.models.transformer import Transformer
from zili.parallel.compile import compile_model
from zili.train.step import lm_loss


def args_for(**kw):
    base = dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=101, max_seq_len=64,
                qkv_bias=True, rope_theta=1_000_000.0)
    return ModelArgs(**{**base, **kw})


def build(args, seed=0):
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights(seed)
    with torch.no_grad():  # non-trivial norm weights and biases, so that every parameter matters
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                p.add_(0.1 * torch.randn_like(p))
    return model


def textbook_logits(model, tokens):
    """Llama/Qwen2 forward written out naively from the model's parameters (fp32)."""
    a = model.args
    B, T = tokens.shape
    d = a.head_dim
    inv = 1.0 / (a.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.outer(torch.arange(T, dtype=torch.float64), inv)
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()

    def rope(x):
        return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + a.norm_eps) * w

    h = model.embed.weight[tokens]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for blk in model.blocks.values():
        x = norm(h, blk.attn_norm.weight)
        q = blk.attn.q_proj(x).view(B, T, a.n_heads, d).transpose(1, 2)
        k = blk.attn.k_proj(x).view(B, T, a.n_kv_heads, d).transpose(1, 2)
        v = blk.attn.v_proj(x).view(B, T, a.n_kv_heads, d).transpose(1, 2)
        q, k = rope(q), rope(k)
        rep = a.n_heads // a.n_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        att = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v
        h = h + blk.attn.o_proj(att.transpose(1, 2).reshape(B, T, -1))
        x = norm(h, blk.mlp_norm.weight)
        h = h + blk.mlp.down_proj(F.silu(blk.mlp.gate_proj(x)) * blk.mlp.up_proj(x))
    head = model.embed.weight if model.lm_head is None else model.lm_head.weight
    return norm(h, model.norm.weight) @ head.t()


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("T,block", [(1, 256), (7, 256), (20, 8), (24, 8), (33, 256)])
def test_causal_attention_equals_sdpa_values_and_gradients(n_heads, n_kv_heads, T, block):
    torch.manual_seed(0)
    q = torch.randn(2, n_heads, T, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, n_kv_heads, T, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, n_kv_heads, T, 16, dtype=torch.float64, requires_grad=True)
    out = causal_attention(q, k, v, block=block)
    rep = n_heads // n_kv_heads
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
    assert torch.allclose(out, ref, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_fp32_logits_equal_textbook_model(tied):
    model = build(args_for(tied_embeddings=tied))
    tokens = torch.randint(0, 101, (3, 40))
    with torch.no_grad():
        expected = textbook_logits(model, tokens)
        assert torch.allclose(model(tokens), expected, atol=1e-5, rtol=0)  # scaled_dot_product_attention
    assert torch.allclose(model(tokens), expected, atol=1e-5, rtol=0)  # with gradients: matmul attention


def test_matmul_and_sdpa_attention_paths_agree(monkeypatch):
    """The CPU matmul path (default here) against the scaled_dot_product_attention path, forward and
    backward, in fp32 and under bf16 autocast."""
    model = build(args_for())
    other = copy.deepcopy(model)
    tokens = torch.randint(0, 101, (2, 33))
    results = {}
    for name, limit in (("matmul", cpu.MATMUL_ATTENTION_MAX_SCORES), ("sdpa", 0)):
        monkeypatch.setattr(cpu, "MATMUL_ATTENTION_MAX_SCORES", limit)
        m = model if name == "matmul" else other
        for dtype in (torch.float32, torch.bfloat16):
            m.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                logits = m(tokens[:, :-1])
            lm_loss(logits, tokens[:, 1:]).backward()
            results[name, dtype] = logits.float(), {n: p.grad.clone() for n, p in m.named_parameters()}
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        (la, ga), (lb, gb) = results["matmul", dtype], results["sdpa", dtype]
        assert torch.allclose(la, lb, atol=tol, rtol=0)
        for n in ga:
            assert torch.allclose(ga[n], gb[n], atol=tol * max(1.0, gb[n].abs().max().item()), rtol=0), n


def test_fp32_logits_equal_hugging_face_qwen2():
    transformers = pytest.importorskip("transformers")
    args = args_for(n_layers=2, n_heads=4, n_kv_heads=2)
    model = build(args)
    config = transformers.Qwen2Config(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        max_position_embeddings=args.max_seq_len, rope_theta=args.rope_theta, rms_norm_eps=args.norm_eps,
        tie_word_embeddings=False, attn_implementation="eager",
    )
    hf = transformers.Qwen2ForCausalLM(config).eval()
    names = {"embed": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head", "attn_norm": "input_layernorm",
             "mlp_norm": "post_attention_layernorm", "attn": "self_attn", "mlp": "mlp"}
    state = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "blocks":
            parts = ["model", "layers", parts[1], names[parts[2]], *parts[3:]]
        else:
            parts = [names[parts[0]], *parts[1:]]
        state[".".join(parts)] = value
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    tokens = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        assert torch.allclose(model(tokens), hf(input_ids=tokens).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_loss_equals_cross_entropy_value_and_gradient(dtype):
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 50, 333)).to(dtype).requires_grad_()
    targets = torch.randint(0, 333, (3, 50))
    targets[0, :7] = -100  # ignored positions
    ours = lm_loss(logits, targets)
    (g_ours,) = torch.autograd.grad(ours, logits)
    ref = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert ours.dtype == torch.float32 and g_ours.dtype == dtype
    assert torch.allclose(ours, ref, atol=1e-6, rtol=1e-6)
    ulp = 1e-7 if dtype == torch.float32 else 2 ** -8 * g_ref.abs().max().item()
    assert torch.allclose(g_ours.float(), g_ref.float(), atol=ulp, rtol=0)
    assert torch.all(g_ours[0, :7] == 0)


def test_rmsnorm_hands_the_autocast_dtype_to_the_matmuls():
    model = build(args_for())
    x = torch.randn(2, 5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model.blocks["0"].attn_norm(x)
    assert y.dtype == torch.bfloat16
    assert model.blocks["0"].attn_norm(x).dtype == torch.float32


def test_row_major_grad_linear_equals_nn_linear():
    torch.manual_seed(0)
    plain = torch.nn.Linear(24, 40)
    swapped = copy.deepcopy(plain)
    swapped.__class__ = cpu._RowMajorGradLinear
    x = torch.randn(3, 7, 24)
    for bf16 in (False, True):
        grads = []
        for layer in (plain, swapped):
            layer.zero_grad()
            xx = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = layer(xx)
            assert out.dtype == (torch.bfloat16 if bf16 else torch.float32)
            (out.float() ** 2).sum().backward()
            grads.append([xx.grad, layer.weight.grad, layer.bias.grad])
        for a, b in zip(*grads):
            assert a.dtype == b.dtype and torch.allclose(a, b, atol=1e-5 if not bf16 else 1e-2, rtol=1e-2 * bf16)


@pytest.mark.slow  # torch.compile of every block: ~27 s; `make test-slow`
def test_compiled_blocks_keep_names_gradients_and_generation(monkeypatch):
    monkeypatch.setattr(cpu, "MIN_IN_FEATURES_FOR_ROW_MAJOR_GRAD", 0)  # exercise the custom backward
    args = args_for(n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=48, vocab_size=50)
    eager = build(args)
    compiled = copy.deepcopy(eager)
    compile_model(compiled, "cpu")
    assert type(compiled.blocks["0"].mlp.up_proj) is cpu._RowMajorGradLinear
    assert list(compiled.state_dict()) == list(eager.state_dict())
    tokens = torch.randint(0, 50, (2, 17))
    for model in (eager, compiled):
        lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-5), name
    eager.eval(), compiled.eval()
    assert generate(compiled, [1, 2, 3], 10) == generate(eager, [1, 2, 3], 10)  # KV-cache path runs eagerly
