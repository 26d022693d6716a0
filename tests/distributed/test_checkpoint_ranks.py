"""Verified checkpoints on 2 real gloo ranks: the manifest covers both ranks' shards (each rank hashes its own),
rank 0 alone verifies and both ranks use its choice, and a full disk on one rank — in DCP's writes or in zili's
manifest part — stops both ranks with the same one-line error and leaves no temporary directory.

Run as a script, this file is the worker: one rank of an FSDP-sharded linear layer; it prints its findings as JSON.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

from tests.distributed.conftest import check_ok


def test_two_ranks_write_one_manifest_agree_on_the_checkpoint_and_fail_together(python_ranks, tmp_path):
    run_dir = tmp_path / "run"
    results = python_ranks(2, __file__, run_dir)
    check_ok(results)
    found = [json.loads(r.stdout.strip().splitlines()[-1]) for r in results]
    assert found[0]["manifest"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json"]
    assert found[0]["latest"] == found[1]["latest"] == "step-0000001"  # step 2 lost a byte of rank 1's shard
    warnings = [line for line in results[0].stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step-0000002 is damaged (__1_0.distcp: size" in warnings[0]
    assert "warning:" not in results[1].stderr  # rank 1 did not verify: it took rank 0's answer
    for phase in ("dcp", "part"):
        assert found[0][phase] == found[1][phase]  # the same line on both ranks
        assert found[0][phase].startswith("no space left on device writing checkpoint step 3 to ")
        assert found[0][phase].endswith("the previous checkpoint step-0000001 is intact")  # step 2 is damaged
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]


def worker(run_dir: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from zili import checkpoint
    from zili.checkpoint import manifest as checkpoint_manifest
    from zili.errors import UserError

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 32, bias=False)
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    first = checkpoint.save_model(run_dir, 1, model, {})
    second = checkpoint.save_model(run_dir, 2, model, {})
    manifest = [e["path"] for e in json.loads((first / "manifest.json").read_text())["files"]]
    dist.barrier()
    if rank == 0:
        shard = second / "__1_0.distcp"
        shard.write_bytes(shard.read_bytes()[:-4])
    dist.barrier()
    found = {"manifest": manifest, "latest": checkpoint.latest(run_dir).name}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    for phase, module, name in (("dcp", os, "fsync"), ("part", checkpoint_manifest, "write_part")):
        real = getattr(module, name)
        if rank == 1:
            setattr(module, name, full)
        try:
            checkpoint.save_model(run_dir, 3, model, {})
            found[phase] = "saved"
        except UserError as e:
            found[phase] = str(e)
        setattr(module, name, real)
    print(json.dumps(found))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(worker(Path(sys.argv[1])))
