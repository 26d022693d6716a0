"""Multi-token prediction (DeepSeek-V3, depth 1): position i predicts token i+2 from tokens up to i+1 only, its
loss trains the extra layer without changing the reported language-modelling loss, and the accountant counts
it."""

import contextlib
import dataclasses

import pytest
import torch

from tests.unit.test_mla import MLA, build
from zili.errors import UserError
from zili.models.flops import flops_per_token, matmul_params, param_counts
from zili.models.presets import get_preset
from zili.models.transformer import Transformer
from zili.parallel.apply import ParallelModel
from zili.parallel.layout import Layout
from zili.train.step import forward_backward

MTP = dataclasses.replace(MLA, mtp_depth=1)


class OnePart(ParallelModel):
    """The ParallelModel of a one-process model (what forward_backward takes)."""

    def __init__(self, model):
        super().__init__([model], Layout())


def test_mtp_position_i_sees_tokens_up_to_i_plus_1_only():
    model = build(MTP)
    tokens = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 101
    with torch.no_grad():
        logits, mtp = model(tokens, mtp=True)
        _, mtp_changed = model(changed, mtp=True)
        assert mtp.shape == (2, 19, 101) and torch.equal(logits, model(tokens))
    # positions 0..10 use tokens <= 11 (up to rounding: the experts' grouped matmuls see other group sizes)
    torch.testing.assert_close(mtp_changed[:, :11], mtp[:, :11], rtol=0, atol=1e-6)
    assert (mtp_changed[:, 11] - mtp[:, 11]).abs().max() > 1e-4  # position 11 takes token 12's embedding


def test_mtp_loss_trains_the_extra_layer_and_leaves_the_reported_loss_alone():
    model = build(MTP).train()
    tokens = torch.randint(0, 101, (4, 21), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    plain, none = forward_backward(OnePart(model), inputs, targets, micro_batch=2, autocast=contextlib.nullcontext)
    assert none is None and model.mtp["0"].eh_proj.weight.grad is None
    model.zero_grad()
    loss, mtp_loss = forward_backward(OnePart(model), inputs, targets, micro_batch=2,
                                      autocast=contextlib.nullcontext, mtp_weight=0.3)
    torch.testing.assert_close(loss, plain)  # the reported loss is the language-modelling one
    with torch.no_grad():
        _, mtp_logits = model(inputs, mtp=True)
    want = torch.nn.functional.cross_entropy(mtp_logits.flatten(0, 1), targets[:, 1:].flatten())
    torch.testing.assert_close(mtp_loss, want, atol=1e-5, rtol=1e-5)
    assert model.mtp["0"].eh_proj.weight.grad.abs().sum() > 0


def test_accountant_counts_the_mtp_layer():
    v3 = get_preset("deepseek-v3")
    with_mtp = dataclasses.replace(v3, mtp_depth=1)
    extra = param_counts(with_mtp)["total"] - param_counts(v3)["total"]
    # eh_proj, one expert block with MLA, three norms: DeepSeek's 14 B MTP module less its embedding/head copies
    assert extra == param_counts(with_mtp)["mtp"] and abs(extra / 11.61e9 - 1) < 1e-3
    assert matmul_params(with_mtp) > matmul_params(v3) + 129280 * 7168  # the head runs twice
    assert flops_per_token(with_mtp, 4096) > flops_per_token(v3, 4096)
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(MLA, mtp_depth=1))
    assert sum(p.numel() for p in model.parameters()) == param_counts(model.args)["total"]


def test_mtp_depth_beyond_one_is_refused():
    with pytest.raises(UserError, match="mtp_depth must be 0"):
        dataclasses.replace(MLA, mtp_depth=2).validate()


def mla_moe_mtp_settings(tiny_dataset, run_dir, steps: int) -> list[tuple[str, str]]:
    settings = {"model.preset": "tiny-moe", "model.n_layers": "2", "model.dim": "64", "model.ffn_dim": "128",
                "model.attention": "mla", "model.n_kv_heads": "4", "model.q_lora_rank": "32",
                "model.kv_lora_rank": "16", "model.qk_nope_head_dim": "16", "model.qk_rope_head_dim": "8",
                "model.v_head_dim": "16", "model.mtp_depth": "1", "data.dataset": str(tiny_dataset),
                "training.run_dir": str(run_dir), "training.steps": str(steps), "training.seq_len": "32",
                "training.batch_size": "4", "training.dtype": "fp32", "training.eval_every": "0",
                "training.sample_tokens": "0", "metrics.progress": "false", "metrics.log_every": "1",
                "checkpoint.every": "4"}
    return list(settings.items())


def records(run_dir) -> dict[int, dict]:
    import json

    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_trainer_trains_an_mla_moe_model_with_mtp_logs_its_loss_and_resumes(tiny_dataset, tmp_path):
    from zili.config import load_config
    from zili.train.trainer import Trainer

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    Trainer(load_config(None, mla_moe_mtp_settings(tiny_dataset, whole, 8))).run()
    mtp = {s: r["mtp_loss"] for s, r in records(whole).items() if "mtp_loss" in r}
    assert sorted(mtp) == list(range(1, 9)) and mtp[8] < mtp[1]
    # interrupted after 4 steps, then resumed: the same losses, bit for bit
    Trainer(load_config(None, mla_moe_mtp_settings(tiny_dataset, parts, 8) + [("training.exit_after", "4")])).run()
    Trainer(load_config(None, mla_moe_mtp_settings(tiny_dataset, parts, 8) + [("checkpoint.resume", "auto")])).run()
    a, b = records(whole), records(parts)
    for step in range(5, 9):
        for key in ("loss", "mtp_loss"):
            assert a[step][key] == b[step][key], (step, key)
