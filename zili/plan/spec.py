"""The planner's inputs: the architecture (`Arch`), the cluster (`Cluster`: a chip-table row, a count and a
node size) and the token budget.

`Arch` holds the keys of a model file (top-level, or under `[model]`): n_layers, dim, n_heads, n_kv_heads,
ffn_dim, vocab_size, seq_len (tokens), mlp ("swiglu" | "gelu"), tied_embeddings, qkv_bias, dropout, and for
mixture-of-experts n_routed_experts, n_shared_experts, top_k, moe_ffn_dim, n_dense_layers. `mlp = "gelu"` is the
GPT block's MLP (h -> ffn -> h through GELU), `swiglu` zili's (gate and up, SiLU, down). `dropout = true` (default
false, as zili and most LLM pre-training) stores dropout masks, as the GPT-3-era Megatron-LM runs did.

A chip file holds the chip-table fields (zili/chips.toml) at the top level or under one `[chip.NAME]`.
Every problem with either file is a `UserError` naming the field.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from zili.errors import UserError

REQUIRED_ARCH = ("n_layers", "dim", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "seq_len")
MOE_KEYS = ("n_routed_experts", "n_shared_experts", "top_k", "moe_ffn_dim", "n_dense_layers")
CHIP_FIELDS = ("bf16_tflops", "fp16_tflops", "hbm_gb", "scale_up_gbps", "scale_out_gbps")
DEFAULT_SEQ_LEN = 4096  # tokens, for presets (their max_seq_len is what RoPE covers, not what one trains at)


@dataclass(frozen=True)
class Arch:
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    seq_len: int
    mlp: str = "swiglu"
    tied_embeddings: bool = False
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    top_k: int = 0
    moe_ffn_dim: int = 0
    n_dense_layers: int = 0
    qkv_bias: bool = False
    dropout: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0


def _check_arch(values: dict, where: str) -> Arch:
    known = {f.name for f in fields(Arch)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} — model keys are {', '.join(sorted(known))}")
    for key in REQUIRED_ARCH:
        if key not in values:
            raise UserError(f"{where}: missing {key} — give all of {', '.join(REQUIRED_ARCH)}")
    for key, value in values.items():
        if key == "mlp":
            if value not in ("swiglu", "gelu"):
                raise UserError(f"{where}: mlp must be \"swiglu\" or \"gelu\", got {value!r}")
        elif key in ("tied_embeddings", "qkv_bias", "dropout"):
            if not isinstance(value, bool):
                raise UserError(f"{where}: {key} must be true or false, got {value!r}")
        elif not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"{where}: {key} must be a whole number, got {value!r}")
        elif value < 0 or (value == 0 and key in REQUIRED_ARCH):
            raise UserError(f"{where}: {key} must be {'positive' if key in REQUIRED_ARCH else 'zero or more'}, "
                            f"got {value}")
    arch = Arch(**values)
    if arch.dim % arch.n_heads or arch.n_heads % arch.n_kv_heads:
        raise UserError(f"{where}: n_heads must divide dim and n_kv_heads must divide n_heads "
                        f"(dim {arch.dim}, n_heads {arch.n_heads}, n_kv_heads {arch.n_kv_heads})")
    if arch.is_moe:
        if not (0 < arch.top_k <= arch.n_routed_experts and arch.moe_ffn_dim > 0):
            raise UserError(f"{where}: a mixture-of-experts model needs 0 < top_k <= n_routed_experts and "
                            "moe_ffn_dim > 0")
        if arch.n_dense_layers >= arch.n_layers:
            raise UserError(f"{where}: n_dense_layers ({arch.n_dense_layers}) leaves no expert layers")
    return arch


def arch_from_model_args(args, seq_len: int) -> Arch:
    return Arch(n_layers=args.n_layers, dim=args.dim, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                ffn_dim=args.ffn_dim, vocab_size=args.vocab_size, seq_len=seq_len,
                tied_embeddings=args.tied_embeddings, qkv_bias=args.qkv_bias)


def load_arch(name_or_file: str, seq_len: int | None = None) -> Arch:
    """A zili preset by name, or a TOML model file; `seq_len` (tokens) overrides the file's/preset's."""
    from zili.models.presets import PRESETS

    if name_or_file in PRESETS:
        args = PRESETS[name_or_file]
        if args.vocab_size == 0:
            raise UserError(f"preset {name_or_file!r} takes its vocabulary from a tokenizer — write a model file "
                            "with vocab_size instead")
        return arch_from_model_args(args, seq_len or min(DEFAULT_SEQ_LEN, args.max_seq_len))
    path = Path(name_or_file)
    if not path.is_file():
        raise UserError(f"--model {name_or_file!r} is neither a preset ({', '.join(PRESETS)}) nor a TOML file")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML ({e}) — fix the file") from None
    values = dict(data.get("model", data))
    if seq_len:
        values["seq_len"] = seq_len
    return _check_arch(values, str(path))


@dataclass(frozen=True)
class Cluster:
    """`count` chips of one kind, `per_node` to a node (scale-up domain)."""

    chip: str
    row: dict
    count: int
    per_node: int

    def peak_flops(self, dtype: str) -> float:
        """Dense matrix peak of one chip in `dtype`, FLOP/s."""
        value = self.row.get(f"{dtype}_tflops", 0) or 0
        if value <= 0:
            raise UserError(f"chip {self.chip} has no {dtype} peak in its table row — pick another --dtype")
        return value * 1e12

    @property
    def hbm_bytes(self) -> float:
        """Device memory in bytes: `hbm_gb` is the vendor's figure, which is binary (an "80 GB" A100 has
        81,920 MiB, i.e. 80 GiB = 85.9e9 bytes)."""
        return self.row["hbm_gb"] * 2**30


def _check_chip(row: dict, where: str) -> dict:
    for key in CHIP_FIELDS:
        if key not in row:
            raise UserError(f"{where}: missing {key} — a chip needs {', '.join(CHIP_FIELDS)}")
    for key, value in row.items():
        if key.endswith(("_tflops", "_gb", "_gbps", "_tbps")) or key == "matmul_efficiency":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise UserError(f"{where}: {key} must be a non-negative number, got {value!r}")
    for key in ("hbm_gb", "scale_up_gbps", "scale_out_gbps"):
        if row[key] <= 0:
            raise UserError(f"{where}: {key} must be positive, got {row[key]}")
    if "matmul_efficiency" in row and not 0 < row["matmul_efficiency"] <= 1:
        raise UserError(f"{where}: matmul_efficiency must be in (0, 1], got {row['matmul_efficiency']}")
    return row


def load_cluster(name_or_file: str, count: int, per_node: int) -> Cluster:
    """A chip-table row by name or a TOML chip file, `count` chips, `per_node` per node."""
    from zili.accel import load_chips

    if count <= 0 or per_node <= 0:
        raise UserError(f"--count and --per-node must be positive, got {count} and {per_node}")
    chips = load_chips()
    if name_or_file in chips:
        name, row = name_or_file, chips[name_or_file]
        if row.get("measured"):
            raise UserError(f"chip {name!r} has no table figures (measured at run time) — give a chip file")
    else:
        path = Path(name_or_file)
        if not path.is_file():
            raise UserError(f"--chip {name_or_file!r} is neither a chip in the table ({', '.join(chips)}) "
                            "nor a TOML file")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid TOML ({e}) — fix the file") from None
        if "chip" in data and len(data["chip"]) == 1 and isinstance(next(iter(data["chip"].values())), dict):
            name, row = next(iter(data["chip"].items()))
        else:
            name, row = path.stem, data
        row = _check_chip(dict(row), str(path))
    per_node = min(per_node, count)
    if count % per_node:
        raise UserError(f"--count {count} is not a whole number of nodes of --per-node {per_node}")
    return Cluster(name, row, count, per_node)


_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(text: str, what: str) -> float:
    """'15T', '300B', '2.5e12' -> a positive number."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"{what} {text!r} is not a positive amount — write e.g. 15T, 300B or 2.5e12")
    return float(m.group(1)) * _SUFFIX[m.group(2).upper()]
