"""zili.data.loader: packing, split, shuffling, rank slices, resume, validation batches, checks.

The synthetic datasets hold tokens 0, 1, 2, ... in order, so a sequence's first token says where it
came from and targets are exactly inputs + 1.
"""

import numpy as np
import pytest
import torch

from zili.data.loader import Loader, PackedDataset
from zili.data.manifest import write_manifest
from zili.data.shards import file_sha256, shard_name
from zili.errors import UserError


def make_dataset(directory, shard_sizes):
    """A dataset whose shards hold consecutive integers (uint32), with the given token counts."""
    directory.mkdir(parents=True, exist_ok=True)
    shards, start = [], 0
    for i, size in enumerate(shard_sizes):
        path = directory / shard_name(i)
        np.arange(start, start + size, dtype="<u4").tofile(path)
        shards.append({"file": path.name, "tokens": size, "sha256": file_sha256(path)})
        start += size
    write_manifest(directory, {"format": 1, "dtype": "uint32", "vocab_size": 1 << 20, "eos_id": 0,
                               "total_tokens": start, "documents": 1, "shards": shards,
                               "tokenizer": "tokenizer"})
    return PackedDataset(directory)


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "ds", [1000, 700, 301])  # 99 + 69 + 30 = 198 sequences at seq_len 10


def consumed(loader, n_batches):
    out = []
    for _ in range(n_batches):
        loader.next_batch()
        out.extend(loader.last_batch_ids)
    return out


def test_packing_per_shard(tmp_path):
    ds = make_dataset(tmp_path / "ds", [10, 7, 1, 25])
    assert ds.n_sequences(3) == 3 + 2 + 0 + 8
    firsts = [int(ds.sequence(i, 3)[0]) for i in range(ds.n_sequences(3))]
    assert firsts == [0, 3, 6, 10, 13, 18, 21, 24, 27, 30, 33, 36, 39]
    assert ds.sequence(4, 3).tolist() == [13, 14, 15, 16]  # seq_len + 1 tokens, inside shard 1
    assert ds.gather(np.array([12, 0]), 3).tolist() == [[39, 40, 41, 42], [0, 1, 2, 3]]
    with pytest.raises(IndexError):
        ds.sequence(13, 3)
    assert ds.tokenizer_dir == tmp_path / "ds" / "tokenizer"


def test_batches_are_int64_and_targets_shift_inputs(dataset):
    loader = Loader(dataset, seq_len=10, batch_size=8, seed=0, val_fraction=0.05)
    inputs, targets = loader.next_batch()
    assert inputs.shape == targets.shape == (8, 10) and inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(targets, inputs + 1)
    firsts = [int(dataset.sequence(i, 10)[0]) for i in loader.last_batch_ids]
    assert inputs[:, 0].tolist() == firsts


def test_order_depends_on_seed_only(dataset):
    a = consumed(Loader(dataset, 10, 8, seed=1, val_fraction=0.05), 5)
    b = consumed(Loader(dataset, 10, 8, seed=1, val_fraction=0.05), 5)
    c = consumed(Loader(dataset, 10, 8, seed=2, val_fraction=0.05), 5)
    assert a == b and a != c


def test_every_train_id_once_per_epoch(dataset):
    loader = Loader(dataset, 10, 8, seed=3, val_fraction=0.05)
    n = loader.n_train
    ids = consumed(loader, -(-3 * n // 8))  # a bit over three epochs; batches straddle epoch ends
    epochs = [sorted(ids[e * n:(e + 1) * n]) for e in range(3)]
    assert all(epoch == sorted(loader.train_ids.tolist()) for epoch in epochs)
    assert ids[:n] != ids[n:2 * n]  # reshuffled
    assert loader.epoch == loader.position / n and loader.state_dict()["epoch"] == 3


def test_validation_split_is_fixed_disjoint_and_spread(dataset):
    loaders = [Loader(dataset, 10, 8, seed=s, val_fraction=0.1, rank=r, world_size=w)
               for s, r, w in [(0, 0, 1), (99, 1, 2), (5, 3, 4)]]
    val = loaders[0].val_ids.tolist()
    assert all(lo.val_ids.tolist() == val for lo in loaders)
    assert len(val) == round(0.1 * 198) and set(val).isdisjoint(loaders[0].train_ids.tolist())
    assert len(val) + loaders[0].n_train == dataset.n_sequences(10)
    assert min(val) < 198 // 10 and max(val) > 198 * 9 // 10  # spread over the whole corpus
    assert Loader(dataset, 10, 8, seed=0, val_fraction=1e-9).n_val == 1
    assert Loader(dataset, 10, 8, seed=0, val_fraction=0.0).n_val == 0


def test_rank_slices_reassemble_the_global_batch(dataset):
    single = Loader(dataset, 10, 8, seed=4, val_fraction=0.05)
    ranks = [Loader(dataset, 10, 8, seed=4, val_fraction=0.05, rank=r, world_size=2) for r in range(2)]
    for _ in range(30):  # crosses an epoch boundary
        x, y = single.next_batch()
        parts = [lo.next_batch() for lo in ranks]
        assert all(p[0].shape == (4, 10) for p in parts)
        assert ranks[0].last_batch_ids + ranks[1].last_batch_ids == single.last_batch_ids
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_resume_continues_the_same_sequence(dataset, world_size):
    reference = consumed(Loader(dataset, 10, 8, seed=7, val_fraction=0.05), 40)
    first = Loader(dataset, 10, 8, seed=7, val_fraction=0.05)
    consumed(first, 23)  # mid second epoch
    state = first.state_dict()
    resumed = []
    ranks = [Loader(dataset, 10, 8, seed=7, val_fraction=0.05, rank=r, world_size=world_size)
             for r in range(world_size)]
    for lo in ranks:
        lo.load_state_dict(dict(state))
    for _ in range(17):
        for lo in ranks:
            lo.next_batch()
            resumed.extend(lo.last_batch_ids)
    assert resumed == reference[23 * 8:]


def test_val_batches_repeat_and_cycle(tmp_path):
    ds = make_dataset(tmp_path / "ds", [500])  # 49 sequences at seq_len 10 -> 2 validation ids at 0.05
    rank1 = Loader(ds, 10, 4, seed=0, val_fraction=0.05, rank=1, world_size=2)
    first = list(rank1.val_batches(3))
    second = list(rank1.val_batches(3))
    assert len(first) == 3 and all(x.shape == (2, 10) for x, _ in first)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    starts = {int(x[i, 0]) for x, _ in first for i in range(2)}
    assert starts == {int(ds.sequence(i, 10)[0]) for i in rank1.val_ids.tolist()}  # cycles over both ids
    assert list(Loader(ds, 10, 4, seed=0, val_fraction=0.0).val_batches(2)) == []


def test_user_errors(dataset, tmp_path):
    with pytest.raises(UserError, match="divisible by 3"):
        Loader(dataset, 10, 8, seed=0, val_fraction=0.05, world_size=3)
    with pytest.raises(UserError, match=r"needs at least \d+ tokens"):
        Loader(dataset, 100, 64, seed=0, val_fraction=0.05)  # only 9 + 6 + 3 sequences
    with pytest.raises(UserError, match="zili data prepare"):
        PackedDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="zili data prepare"):
        PackedDataset(tmp_path / "empty")


def test_shard_size_and_checksum_are_checked(tmp_path):
    ds = make_dataset(tmp_path / "ds", [100, 100])
    ds.verify()
    shard = tmp_path / "ds" / "shard-00001.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    del ds
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum"):
        PackedDataset(tmp_path / "ds").verify()
    shard.write_bytes(bytes(data[:-4]))
    with pytest.raises(UserError, match="zili data prepare"):
        PackedDataset(tmp_path / "ds")
