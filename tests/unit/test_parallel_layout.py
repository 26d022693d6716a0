"""Pure pieces of the parallel layer: degrees, layout checks, pipeline stage split, layout-free init."""

from __future__ import annotations

import pytest
import torch

from zili.config import Config
from zili.errors import UserError
from zili.models.args import ModelArgs
from zili.models.transformer import Transformer
from zili.parallel.init import init_weights
from zili.parallel.layout import Layout
from zili.parallel.mesh import check_layout, resolve_layout, stages_per_rank
from zili.parallel.pipeline import layer_ranges, stage_ids, stage_module
from zili.train.step import clip_grad_norm_

ARGS = ModelArgs(n_layers=4, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=128, max_seq_len=64,
                 tied_embeddings=False)

MOE = dict(n_routed_experts=6, top_k=2, moe_ffn_dim=32, score_func="softmax")  # a mixture of experts


def config(**parallelism) -> Config:
    cfg = Config()
    cfg.training.batch_size = 8
    for key, value in parallelism.items():
        setattr(cfg.parallelism, key, value)
    return cfg


def test_dp_shard_minus_one_takes_the_rest_and_the_config_becomes_the_shared_layout():
    cfg = config(tp=2, pp=2, pp_schedule="Interleaved1F1B")
    cfg.training.batch_size = 16
    layout = resolve_layout(cfg, 16)
    assert layout == Layout(pp=2, vpp=2, dp_replicate=1, dp_shard=4, tp=2, microbatch=1, sequence_parallel=True,
                            dtype="bf16")  # 16 sequences over dp 4 = 4 per rank, in 2 x 2 pipeline micro-batches
    assert resolve_layout(config(dp_replicate=2), 8).dp == 8
    assert resolve_layout(config(), 1) == Layout(microbatch=8)
    cfg = config()
    cfg.training.activation_checkpointing, cfg.training.micro_batch_size = True, 2
    assert resolve_layout(cfg, 1) == Layout(microbatch=2, recompute="full")


@pytest.mark.parametrize("layout,world,message", [
    (dict(tp=3), 4, "does not divide the world size 4"),
    (dict(dp_shard=2, tp=2), 8, "needs 4 processes but 8 were started"),
    (dict(tp=2), 1, "needs 2 processes but this is a single process"),
])
def test_degrees_must_multiply_to_world_size(layout, world, message):
    with pytest.raises(UserError, match=message):
        resolve_layout(config(**layout), world)


@pytest.mark.parametrize("layout,overrides,message", [
    (dict(tp=4), {}, "does not divide the model's n_kv_heads"),
    (dict(tp=2), dict(ffn_dim=95), "does not divide the model's ffn_dim"),
    (dict(tp=2), dict(vocab_size=127), "does not divide the model's vocab_size"),
    (dict(pp=4, pp_schedule="Interleaved1F1B"), {}, "makes 8 pipeline stages but the model has 4 layers"),
    (dict(pp=2), dict(tied_embeddings=True), "tied_embeddings=false"),
    (dict(pp=2, pp_microbatches=3), {}, "does not split into pp_microbatches=3"),
    (dict(pp=2, pp_microbatches=1), {}, "1 micro-batches per step cannot fill 2 pipeline stages"),
    (dict(pp=2, pp_schedule="1F1B", pp_stages_per_rank=2), {}, "runs one stage per rank"),
    (dict(dp_shard=3), {}, "not divisible by the data-parallel degree 3"),
    (dict(), dict(mlp="gelu"), "SwiGLU"),
    (dict(dp_shard=4, ep=2), {}, "ep > 1 needs a mixture-of-experts model"),
    (dict(dp_shard=4, ep=4), MOE, "ep=4 does not divide n_routed_experts \\(6\\)"),
    (dict(dp_shard=2, ep=4), dict(MOE, n_routed_experts=8), "ep=4 must divide dp_shard\\*cp = 2"),
    (dict(dp_shard=2, tp=2), dict(MOE, qk_norm=True), "no tensor-parallel plan"),
    (dict(cp=2, dp_shard=1), dict(mtp_depth=1), "context parallelism has no path for multi-token"),
    (dict(dp_shard=2), dict(mtp_depth=1), "multi-token prediction in one process"),
    (dict(cp=2, dp_shard=1, pp=2), {}, "does not combine context parallelism with pipeline"),
    (dict(cp=4, dp_shard=1), {}, "cp=4 cuts each sequence into 2\\*cp = 8 equal chunks"),
])
def test_layout_checks(layout, overrides, message):
    cfg = config(**layout)
    cfg.training.seq_len = 36  # 2*cp must divide it: 4 does, 8 does not
    world = cfg.parallelism.pp * max(cfg.parallelism.dp_shard, 1) * cfg.parallelism.tp * cfg.parallelism.cp
    args = ModelArgs(**{**ARGS.to_dict(), **overrides})
    with pytest.raises(UserError, match=message):
        check_layout(resolve_layout(cfg, world), args, cfg.training.batch_size, cfg.training.seq_len)


def test_good_layout_passes_and_counts_stages():
    cfg = config(pp=2, pp_schedule="Interleaved1F1B", dp_shard=2)
    check_layout(resolve_layout(cfg, 4), ARGS, cfg.training.batch_size)
    assert stages_per_rank(cfg.parallelism) == 2
    assert stages_per_rank(config(pp=2).parallelism) == 1


def test_layer_ranges_and_loop_placement():
    assert layer_ranges(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    assert [stage_ids(r, 2, 2) for r in range(2)] == [[0, 2], [1, 3]]


def test_stages_chained_equal_the_whole_model_and_keep_names():
    torch.manual_seed(0)
    whole = Transformer(ARGS)
    whole.init_weights(seed=3)
    with torch.device("meta"):
        meta = Transformer(ARGS)
    stages = [stage_module(meta, s, 3) for s in range(3)]
    names = [set(dict(s.named_parameters())) for s in stages]
    assert set().union(*names) == set(dict(whole.named_parameters()))  # no parameter lost, none renamed
    assert not names[0] & names[1] and not names[1] & names[2]
    tokens = torch.randint(0, ARGS.vocab_size, (2, 16))
    h = tokens
    for stage in stages:
        stage.to_empty(device="cpu")
        init_weights(stage, seed=3)  # same initial values as the whole model, stage by stage
        h = stage(h)
    torch.testing.assert_close(h, whole(tokens), rtol=0, atol=0)


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    b.load_state_dict(a.state_dict())
    a(torch.randn(4, 8)).square().sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        pb.grad = pa.grad.clone()
    ours = clip_grad_norm_(a.parameters(), 0.5)
    theirs = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
    torch.testing.assert_close(ours, theirs)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)
