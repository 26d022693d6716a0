"""A start that costs each rank its shard, identical in every layout: real gloo processes shard a model with
FSDP2, tensor parallelism or both, and `zili.parallel.init.init_weights` computes (random init) or reads
(Hugging Face weights) only each rank's shard — yet the gathered full weights are bit-identical to what one
process computes or reads.

Run as a script, this file is the per-rank worker: `python test_shard_init.py DP TP HF_DIR OUT_DIR`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard  # private: only to build a bad layout

from tests.distributed.conftest import check_ok
from zili.compat import local_region
from zili.errors import UserError
from zili.interop.hf import args_from_config, hf_name, read_config
from zili.interop.import_hf import HFWeights
from zili.models import init as model_init
from zili.models.args import ModelArgs
from zili.models.transformer import Transformer
from zili.parallel.fsdp import apply_fsdp
from zili.parallel.init import init_weights
from zili.parallel.tensor_parallel import apply_tensor_parallel

ARGS = ModelArgs(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256, max_seq_len=64,
                 tied_embeddings=False)
SEED = 1234
MAX_SHARE = 0.6  # of the single-process cost, per rank, in every layout of 2 or more shards


# ---- the worker (one per rank) ------------------------------------------------------------------------
def sharded(args: ModelArgs, mesh, dp: int, tp: int) -> Transformer:
    """`args`'s model built on the meta device, sharded with zili's own transforms, materialised empty."""
    with torch.device("meta"):
        model = Transformer(args)
    if tp > 1:
        apply_tensor_parallel(model, mesh["tp"], sequence_parallel=True)
    if dp > 1:
        apply_fsdp(model, mesh["dp_shard"], torch.float32, False, True)
    model.to_empty(device="cpu")
    return model


def gathered(model) -> dict[str, torch.Tensor]:
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in model.named_parameters()}


def worker(dp: int, tp: int, hf_dir: Path, out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp_shard", "tp"))
    model = sharded(ARGS, mesh, dp, tp)
    before = model_init.ELEMENTS_DRAWN
    init_weights(model, SEED)
    drawn = model_init.ELEMENTS_DRAWN - before
    random_full = gathered(model)
    stats = {"drawn": drawn, "strided": sum(any(isinstance(pl, _StridedShard) for pl in p.placements)
                                            for p in model.parameters() if isinstance(p, DTensor))}
    if dp > 1 and tp > 1:  # rows interleaved across ranks are no region: a loud error, not wrong weights
        try:
            local_region((8, 4), mesh, (Shard(0), _StridedShard(0, split_factor=2)))
        except RuntimeError:
            stats["interleaved_rejected"] = True

    model = sharded(args_from_config(read_config(hf_dir))[0], mesh, dp, tp)
    weights = HFWeights(hf_dir, model)
    init_weights(model, SEED, weights)
    hf_full = gathered(model)
    if rank == 0:
        torch.save({"random": random_full, "hf": hf_full}, out / "full.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({**stats, "bytes_read": weights.bytes_read}))
    dist.destroy_process_group()


# ---- the tests ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Qwen2 (q/k/v bias, untied head) of ARGS's shape, saved in bf16 as most checkpoints are."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=ARGS.vocab_size, hidden_size=ARGS.dim, intermediate_size=ARGS.ffn_dim,
        num_hidden_layers=ARGS.n_layers, num_attention_heads=ARGS.n_heads, num_key_value_heads=ARGS.n_kv_heads,
        max_position_embeddings=ARGS.max_seq_len, tie_word_embeddings=False))
    out = tmp_path_factory.mktemp("qwen2")
    model.to(torch.bfloat16).save_pretrained(out)
    return out


def single_process_random() -> tuple[dict[str, torch.Tensor], int]:
    with torch.device("meta"):
        model = Transformer(ARGS)
    model.to_empty(device="cpu")
    before = model_init.ELEMENTS_DRAWN
    model.init_weights(SEED)
    return {name: p.detach() for name, p in model.named_parameters()}, model_init.ELEMENTS_DRAWN - before


def single_process_hf_bytes(hf_dir: Path) -> int:
    with torch.device("meta"):
        model = Transformer(args_from_config(read_config(hf_dir))[0])
    weights = HFWeights(hf_dir, model)
    for name, p in model.named_parameters():
        weights(name, p.shape)
    return weights.bytes_read


# FSDP alone shards dim 0 only, which FSDP x TP covers (plus the strided case); the parity tests start every
# layout from these weights too
@pytest.mark.parametrize("dp,tp", [(1, 2), (2, 2)], ids=["tp2", "fsdp2xtp2"])
def test_each_rank_pays_for_its_shard_and_the_weights_match_one_process(python_ranks, hf_checkpoint, tmp_path,
                                                                        dp, tp):
    out = tmp_path / "out"
    out.mkdir()
    check_ok(python_ranks(dp * tp, __file__, dp, tp, hf_checkpoint, out, timeout=120))
    full = torch.load(out / "full.pt")
    stats = [json.loads((out / f"rank{r}.json").read_text()) for r in range(dp * tp)]

    reference, drawn = single_process_random()
    assert full["random"].keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(full["random"][name], value), name
    assert all(s["drawn"] <= MAX_SHARE * drawn for s in stats), (stats, drawn)

    tensors = load_file(hf_checkpoint / "model.safetensors")
    for name, value in full["hf"].items():
        assert torch.equal(value, tensors[hf_name(name)].float()), name
    total = single_process_hf_bytes(hf_checkpoint)
    assert total == sum(t.numel() * 2 for t in tensors.values())  # every tensor once, in bf16
    assert all(s["bytes_read"] <= MAX_SHARE * total for s in stats), (stats, total)
    if dp > 1 and tp > 1:  # FSDP2 over TP: regions came through _StridedShard placements
        assert all(s["strided"] > 0 and s["interleaved_rejected"] for s in stats), stats


def test_a_region_is_the_slice_of_the_full_tensor_whatever_the_chunking(monkeypatch):
    shape, name = (24, 20), "blocks.0.mlp.up_proj.weight"
    full = model_init.normal_region(SEED, name, shape, (0, 0), shape, 0.02)
    for offsets, sizes in [((0, 0), (24, 20)), ((7, 0), (5, 20)), ((5, 3), (10, 11)), ((23, 19), (1, 1))]:
        rows, cols = (slice(o, o + s) for o, s in zip(offsets, sizes))
        for chunk in (model_init.CHUNK, 37, 1):
            monkeypatch.setattr(model_init, "CHUNK", chunk)
            assert torch.equal(model_init.normal_region(SEED, name, shape, offsets, sizes, 0.02), full[rows, cols])
    monkeypatch.undo()
    # near-normal with the asked std and bounded; another name or seed gives other values
    big = model_init.normal_region(SEED, name, (512, 512), (0, 0), (512, 512), 0.02)
    assert abs(big.mean()) < 1e-3 and abs(big.std() / 0.02 - 1) < 0.01
    assert big.abs().max() <= math.sqrt(24) * 0.02 * (1 + 1e-6)
    assert not torch.equal(full, model_init.normal_region(SEED + 1, name, shape, (0, 0), shape, 0.02))
    assert not torch.equal(full, model_init.normal_region(SEED, name + "x", shape, (0, 0), shape, 0.02))


def test_hf_weights_read_only_the_region_and_check_the_full_shape(hf_checkpoint):
    with torch.device("meta"):
        model = Transformer(args_from_config(read_config(hf_checkpoint))[0])
    weights = HFWeights(hf_checkpoint, model)
    whole = weights("blocks.1.mlp.down_proj.weight", (64, 128))
    weights.bytes_read = 0
    part = weights("blocks.1.mlp.down_proj.weight", (64, 128), (8, 32), (16, 64))
    assert torch.equal(part, whole[8:24, 32:96]) and weights.bytes_read == 16 * 64 * 2
    with pytest.raises(UserError, match="config.json implies"):
        weights("blocks.1.mlp.down_proj.weight", (128, 64), (0, 0), (1, 1))
    assert weights.bytes_read == 16 * 64 * 2


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
