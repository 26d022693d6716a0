"""torch.compile on CUDA: the model built by `parallelize` with `training.compile = true` (as the trainer builds
it) takes the same optimizer steps as the eager model within bf16 rounding."""

from __future__ import annotations

import time

import pytest
import torch

from zili.config import Config
from zili.models.args import ModelArgs
from zili.models.transformer import Transformer
from zili.parallel.apply import parallelize
from zili.train.optim import build_optimizer
from zili.train.step import lm_loss, train_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ARGS = ModelArgs(n_layers=2, dim=256, n_heads=8, n_kv_heads=4, ffn_dim=688, vocab_size=512, max_seq_len=128)
STEPS = 4
LR = 1e-3  # the loss descends smoothly on the one batch (the default 3e-3 makes the gradient norm jump by step 3)

# Both sides compute in bf16 from bit-identical weights; the compiler fuses elementwise work and keeps some
# intermediates in fp32 where eager rounds them to bf16, which moves the loss by ~1e-4 relative and the
# gradient norm by ~1e-3. A miscompiled block (wrong mask, dropped residual, stale weights) is off by far more.
LOSS_TOL, GRAD_NORM_TOL = 5e-3, 3e-2


def train(compile: bool) -> tuple[list[float], list[float], float, object]:
    """(losses, gradient norms, seconds of the first step, the model) over STEPS steps on one fixed random batch."""
    cfg = Config()
    cfg.training.compile = compile
    cfg.optimizer.lr = LR
    with torch.device("meta"):
        meta_model = Transformer(ARGS)
    model = parallelize(meta_model, cfg, device=torch.device("cuda"), seed=0, compute_dtype=torch.bfloat16,
                        loss_fn=lm_loss)
    optimizers = [build_optimizer(part, cfg.optimizer, "cuda") for part in model.parts]
    tokens = torch.randint(0, ARGS.vocab_size, (4, ARGS.max_seq_len + 1), generator=torch.Generator().manual_seed(1))
    tokens = tokens.cuda()
    losses, norms, first_s = [], [], 0.0
    for step in range(STEPS):
        start = time.perf_counter()
        result = train_step(model, optimizers, tokens[:, :-1], tokens[:, 1:], micro_batch=4, grad_clip=1.0,
                            autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        losses.append(float(result.loss))
        norms.append(float(result.grad_norm))
        if step == 0:
            first_s = time.perf_counter() - start
    return losses, norms, first_s, model


def test_compiled_model_trains_like_eager(record_property):
    from torch._dynamo.utils import counters

    counters.clear()
    eager_losses, eager_norms, _, _ = train(compile=False)
    losses, norms, compile_s, model = train(compile=True)
    blocks = list(model.parts[0].blocks.values())
    assert all(block._compiled_call_impl is not None for block in blocks)  # nn.Module.compile() took effect
    record_property("first_compiled_step_s", round(compile_s, 1))
    record_property("graph_breaks", sum(counters["graph_break"].values()))
    record_property("dynamo_stats", dict(counters["stats"]))  # unique_graphs: graphs captured (shared ones once)
    record_property("losses", {"eager": eager_losses, "compiled": losses})
    for step in range(STEPS):
        assert losses[step] == pytest.approx(eager_losses[step], rel=LOSS_TOL), step
        assert norms[step] == pytest.approx(eager_norms[step], rel=GRAD_NORM_TOL), step
    assert losses[-1] < losses[0]  # the compiled backward and the optimizer step descend on the batch
