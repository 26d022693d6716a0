"""Context parallelism with multi-head latent attention: the latents and rotated shared keys gathered over 2 cp
ranks train like one process (fp32 losses within 1e-4, same sequences). The GQA layouts (cp2, cp2 x tp2,
cp2 x fsdp2) are in test_parity.py, cp 2 -> 1 resuming in test_reshard_resume.py."""

from __future__ import annotations

import pytest

from tests.distributed.conftest import PARITY, check_ok, read_records
from tests.distributed.test_parity import check_parity

# a dense DeepSeek-shaped attention: query LoRA, 16-feature latent, 8 rotated + 16 unrotated key features per head
MLA = ["--model.n_layers=2", "--model.attention=mla", "--model.n_kv_heads=4", "--model.q_lora_rank=32",
       "--model.kv_lora_rank=16", "--model.qk_nope_head_dim=16", "--model.qk_rope_head_dim=8",
       "--model.v_head_dim=16"]


@pytest.mark.slow  # ~15 s; dense cp2 parity stays in the default run (test_parity.py)
def test_mla_at_cp2_matches_single_process(zili_ranks, zili_cli, tiny_dataset, tmp_path):
    common = [*PARITY, f"--data.dataset={tiny_dataset}", *MLA]
    proc = zili_cli("train", *common, f"--training.run_dir={tmp_path / 'one'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_ok(zili_ranks(2, *common, f"--training.run_dir={tmp_path / 'cp2'}", "--parallelism.cp=2",
                        "--parallelism.dp_shard=1"))
    check_parity(read_records(tmp_path / "cp2"), read_records(tmp_path / "one"))
