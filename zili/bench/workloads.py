"""Standard benchmark workloads: Llama-style dense decoders with a fixed sequence length and batch.

`dense-tiny` is a smoke test; the others' sizes follow common small open models (untied head, no bias, SwiGLU,
GQA for the larger one); the data is random token ids from a fixed seed, so a workload is the same on every
machine. Batch and sequence can be lowered for small machines (`--batch`, `--seq`); the JSON records what was
run.
"""

from __future__ import annotations

from dataclasses import dataclass

from zili.models.args import ModelArgs


@dataclass(frozen=True)
class Workload:
    name: str
    args: ModelArgs
    seq_len: int  # tokens per sequence
    batch: int  # sequences per step


WORKLOADS = {
    w.name: w for w in [
        # seconds anywhere: checks a setup end to end (and lets tests compare bench with train)
        Workload("dense-tiny", ModelArgs(n_layers=2, dim=128, n_heads=4, n_kv_heads=2, ffn_dim=384,
                                          vocab_size=1024, max_seq_len=256, rope_theta=10000.0), 256, 4),
        Workload("dense-125m", ModelArgs(n_layers=12, dim=768, n_heads=12, n_kv_heads=12, ffn_dim=2048,
                                          vocab_size=32000, max_seq_len=2048, rope_theta=10000.0), 2048, 8),
        Workload("dense-1b", ModelArgs(n_layers=16, dim=2048, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                                        vocab_size=32000, max_seq_len=2048, rope_theta=500000.0), 2048, 8),
    ]
}
