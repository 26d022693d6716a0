"""Mixture-of-experts layouts train exactly like one process (fp32, 10 steps, real gloo ranks): every logged loss
within 1e-4 relative of a single-process run, the same validation losses, and the same routing decisions —
the global expert load of each step (busiest expert's tokens ÷ mean, a ratio of integer counts) is equal.

The model is DeepSeek-V3-shaped at toy size: a dense first block, then grouped sigmoid routing over 16 experts
(top 4 of 4 groups, 2 groups eligible), a shared expert and the balancing bias moving every step."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.distributed.conftest import PARITY, _env, assert_losses_match, check_ok, read_records
from zili import checkpoint
from zili.infer.run import load_run
from zili.interop.export_hf import export_hf

MOE_PARITY = [*PARITY, "--model.preset=tiny-moe", "--model.moe_ffn_dim=64", "--training.steps=10",
              "--training.eval_every=5", "--moe.bias_update_rate=0.01"]

SLOW = pytest.mark.slow  # left out of the default run (`make test-slow`), to keep it under 10 minutes

LAYOUTS = [
    pytest.param(2, ["--parallelism.ep=2"], id="ep2", marks=SLOW),  # also the first 4 steps of the resume test
    pytest.param(4, ["--parallelism.ep=2", "--parallelism.dp_shard=4"], id="ep2-x-expert-fsdp2"),
    pytest.param(4, ["--parallelism.ep=2", "--parallelism.dp_shard=2", "--parallelism.dp_replicate=2"],
                 id="ep2-x-hsdp", marks=SLOW),
    pytest.param(4, ["--parallelism.ep=2", "--parallelism.tp=2"], id="ep2-x-tp2", marks=SLOW),
    pytest.param(4, ["--parallelism.ep=2", "--parallelism.pp=2", "--parallelism.pp_schedule=1F1B"], id="ep2-x-pp2",
                 marks=SLOW),
    pytest.param(2, ["--parallelism.dp_shard=2"], id="fsdp2-ep1", marks=SLOW),
    pytest.param(2, ["--parallelism.ep=2", "--training.activation_checkpointing=true"], id="ep2-recompute", marks=SLOW),
]


# DeepSeek-V3's attention too: multi-head latent attention with a q LoRA and decoupled rope heads
MLA = ["--model.attention=mla", "--model.q_lora_rank=32", "--model.kv_lora_rank=32", "--model.qk_nope_head_dim=16",
       "--model.qk_rope_head_dim=8", "--model.v_head_dim=16", "--model.n_kv_heads=4"]


def _single_process(root, tiny_dataset, *extra) -> dict[int, dict]:
    subprocess.run([sys.executable, "-m", "zili", "train", *MOE_PARITY, *extra, f"--data.dataset={tiny_dataset}",
                    f"--training.run_dir={root / 'run'}"], env=_env(root), cwd=root, check=True,
                   capture_output=True, timeout=300)
    return read_records(root / "run")


@pytest.fixture(scope="module")
def moe_reference(tmp_path_factory, tiny_dataset, peak_flops) -> dict[int, dict]:
    return _single_process(tmp_path_factory.mktemp("moe-reference"), tiny_dataset)


@SLOW
def test_latent_attention_moe_with_experts_and_pipeline_matches_single_process(zili_ranks, tiny_dataset, tmp_path,
                                                                               peak_flops):
    """DeepSeek-V3's shape (MLA + grouped sigmoid experts) at ep=2 x pp=2, against its own single process."""
    reference = _single_process(tmp_path / "reference", tiny_dataset, *MLA)
    run_dir = tmp_path / "run"
    check_ok(zili_ranks(4, *MOE_PARITY, *MLA, f"--data.dataset={tiny_dataset}", f"--training.run_dir={run_dir}",
                        "--parallelism.ep=2", "--parallelism.pp=2", "--parallelism.pp_schedule=1F1B"))
    records = read_records(run_dir)
    assert_losses_match(reference, records, range(11))
    assert [records[s]["expert_load"] for s in range(1, 11)] == [reference[s]["expert_load"] for s in range(1, 11)]


@pytest.mark.parametrize("ranks,layout", LAYOUTS)
def test_moe_layout_matches_single_process(zili_ranks, tiny_dataset, moe_reference, tmp_path, ranks, layout):
    run_dir = tmp_path / "run"
    check_ok(zili_ranks(ranks, *MOE_PARITY, f"--data.dataset={tiny_dataset}", f"--training.run_dir={run_dir}",
                        *layout))
    records = read_records(run_dir)
    assert sorted(records) == list(range(11))
    assert_losses_match(moe_reference, records, range(11))
    assert all(records[s]["sequence_ids"] == moe_reference[s]["sequence_ids"] for s in range(1, 11))
    assert [records[s]["expert_load"] for s in range(1, 11)] == [moe_reference[s]["expert_load"] for s in range(1, 11)]
    assert moe_reference[10]["loss"] < moe_reference[1]["loss"]


@SLOW  # ~27 s: ep 2 -> 1 -> 4 through three launches
def test_resume_across_expert_parallel_degrees(zili_ranks, zili_cli, tiny_dataset, moe_reference, tmp_path):
    """ep=2 for steps 1-4, one process for 5-7, ep=4 (over 4 FSDP ranks) for 8-10: the same losses and routing as
    the uninterrupted single-process run, optimizer state and balancing bias included."""
    run_dir = tmp_path / "run"
    common = [*MOE_PARITY, f"--data.dataset={tiny_dataset}", f"--training.run_dir={run_dir}"]
    check_ok(zili_ranks(2, *common, "--parallelism.ep=2", "--training.exit_after=4"))
    one = zili_cli("train", *common, "--checkpoint.resume=auto", "--training.exit_after=3")
    assert one.returncode == 0 and "at step 4" in one.stdout, one.stderr[-3000:]
    four = zili_ranks(4, *common, "--checkpoint.resume=auto", "--parallelism.ep=4", "--parallelism.dp_shard=4")
    check_ok(four)
    assert "at step 7" in four[0].stdout
    records = read_records(run_dir)
    assert sorted(records) == list(range(11))
    assert_losses_match(moe_reference, records, range(1, 11))
    assert [records[s]["expert_load"] for s in range(1, 11)] == [moe_reference[s]["expert_load"] for s in range(1, 11)]
    assert all(records[s]["sequence_ids"] == moe_reference[s]["sequence_ids"] for s in range(1, 11))


QWEN3_MOE = ["--model.score_func=softmax", "--model.n_shared_experts=0", "--model.n_dense_layers=0",
             "--model.routed_scaling_factor=1.0", "--model.n_group=1", "--model.topk_group=1", "--model.qk_norm=true"]


def test_expert_parallel_checkpoint_exports_like_one_process(zili_ranks, tiny_dataset, tmp_path):
    """A Qwen3-MoE-shaped model trained with ep=2: its checkpoint (each rank wrote its experts) exports to the
    same bytes as the same weights written by one process."""
    pytest.importorskip("transformers")
    sharded = tmp_path / "sharded"
    check_ok(zili_ranks(2, *MOE_PARITY, *QWEN3_MOE, f"--data.dataset={tiny_dataset}", "--training.steps=2",
                        "--training.eval_every=0", "--parallelism.ep=2", f"--training.run_dir={sharded}"))
    path = checkpoint.resolve(sharded)
    assert len(list(path.glob("*.distcp"))) == 2
    model, _ = load_run(sharded, device="cpu")
    single = tmp_path / "single"
    checkpoint.save_model(single, 2, model, checkpoint.read_meta(path))
    (single / "tokenizer").symlink_to(sharded / "tokenizer")
    a, b = export_hf(sharded, tmp_path / "out-ep2"), export_hf(single, tmp_path / "out-single")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and "model.safetensors" in names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert b'"Qwen3MoeForCausalLM"' in (a / "config.json").read_bytes()
