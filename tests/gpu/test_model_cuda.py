"""The model on CUDA in bf16 autocast equals the same model on the CPU in fp32 within bf16 rounding: logits,
loss and the gradient of every weight."""

from __future__ import annotations

import copy

import pytest
import torch

from zili.models.args import ModelArgs
from zili.models.transformer import Transformer
from zili.train.step import lm_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# GQA (8 query heads on 4 KV heads), two blocks, head_dim 32
ARGS = ModelArgs(n_layers=2, dim=256, n_heads=8, n_kv_heads=4, ffn_dim=688, vocab_size=512, max_seq_len=128)

# bf16 keeps 8 bits of mantissa (~2e-3 relative rounding per operation). Through two blocks this model's logits
# land ~0.6 % from fp32 and the weight gradients ≤ ~1 % (measured with bf16 autocast on a CPU); the bounds leave
# ~5x room, while a wrong kernel, layout or cast is off by tens of percent. Relative errors are ‖a - b‖ / ‖b‖.
LOGITS_TOL, GRAD_TOL, LOSS_TOL = 3e-2, 5e-2, 5e-3


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


def test_bf16_cuda_forward_backward_matches_cpu_fp32(record_property):
    reference = Transformer(ARGS)
    reference.init_weights(seed=0)
    model = copy.deepcopy(reference).cuda()
    tokens = torch.randint(0, ARGS.vocab_size, (4, ARGS.max_seq_len + 1), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    ref_logits = reference(inputs)
    ref_loss = lm_loss(ref_logits, targets)
    ref_loss.backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(inputs.cuda())
    loss = lm_loss(logits, targets.cuda())
    loss.backward()

    assert logits.dtype == torch.bfloat16 and logits.device.type == "cuda"  # autocast really computed in bf16
    logits_error = relative_error(logits, ref_logits)
    loss_value, ref_value = float(loss.detach()), float(ref_loss.detach())
    loss_error = abs(loss_value - ref_value) / ref_value
    grad_errors = {}
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        assert p.grad is not None and p.grad.dtype == torch.float32, name  # fp32 master weights, fp32 gradients
        grad_errors[name] = relative_error(p.grad, ref.grad)
    worst = max(grad_errors, key=grad_errors.get)
    record_property("logits_rel_error", round(logits_error, 5))
    record_property("loss_rel_error", round(loss_error, 6))
    record_property("worst_grad_rel_error", [worst, round(grad_errors[worst], 5)])
    assert logits_error < LOGITS_TOL
    assert loss_error < LOSS_TOL, (loss_value, ref_value)
    assert grad_errors[worst] < GRAD_TOL, f"{worst}: {grad_errors[worst]:.4f}"
