"""The planner's inputs: the model (`load_model`: a `ModelArgs` and the sequence length it trains at), the
cluster (`Cluster`: a chip-table row, a count and a node size) and the token budget.

A model is a zili preset or a TOML file with these keys (top-level, or under `[model]`): n_layers, dim, n_heads,
n_kv_heads, ffn_dim, vocab_size, seq_len (tokens), mlp ("swiglu" | "gelu"), tied_embeddings, qkv_bias, dropout,
and for mixture-of-experts n_routed_experts, n_shared_experts, top_k, moe_ffn_dim, n_dense_layers. All but
seq_len are `ModelArgs` fields (zili/models/args.py says what they mean); seq_len is a training choice, so the
planner carries it beside the architecture.

A chip file holds the chip-table fields (zili/chips.toml) at the top level or under one `[chip.NAME]`.
Every problem with either file is a `UserError` naming the field.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from zili.accel import load_chips
from zili.errors import UserError
from zili.models.args import ModelArgs
from zili.models.presets import PRESETS
from zili.parallel.layout import Layout

REQUIRED_KEYS = ("n_layers", "dim", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "seq_len")
MOE_KEYS = ("n_routed_experts", "n_shared_experts", "top_k", "moe_ffn_dim", "n_dense_layers")
FLAG_KEYS = ("tied_embeddings", "qkv_bias", "dropout")
# every key of a model file, in the order `zili plan --json` reports them
MODEL_KEYS = (*REQUIRED_KEYS, "mlp", "tied_embeddings", *MOE_KEYS, "qkv_bias", "dropout")
CHIP_FIELDS = ("bf16_tflops", "fp16_tflops", "hbm_gb", "scale_up_gbps", "scale_out_gbps")
FRACTIONS = ("matmul_efficiency", "all_to_all_exposed")  # calibrated chip-row constants, each in (0, 1]
DEFAULT_SEQ_LEN = 4096  # tokens, for presets (their max_seq_len is what RoPE covers, not what one trains at)


def _check_model(values: dict, where: str) -> tuple[ModelArgs, int]:
    """The architecture and seq_len of a model file's `values`; UserError naming the first bad key."""
    unknown = sorted(set(values) - set(MODEL_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} — model keys are {', '.join(sorted(MODEL_KEYS))}")
    for key in REQUIRED_KEYS:
        if key not in values:
            raise UserError(f"{where}: missing {key} — give all of {', '.join(REQUIRED_KEYS)}")
    for key, value in values.items():
        if key == "mlp":
            if value not in ("swiglu", "gelu"):
                raise UserError(f"{where}: mlp must be \"swiglu\" or \"gelu\", got {value!r}")
        elif key in FLAG_KEYS:
            if not isinstance(value, bool):
                raise UserError(f"{where}: {key} must be true or false, got {value!r}")
        elif not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"{where}: {key} must be a whole number, got {value!r}")
        elif value < 0 or (value == 0 and key in REQUIRED_KEYS):
            raise UserError(f"{where}: {key} must be {'positive' if key in REQUIRED_KEYS else 'zero or more'}, "
                            f"got {value}")
    arch = {k: v for k, v in values.items() if k != "seq_len"}
    # the RoPE table need not cover more than the planned sequence (it matters only to --verify)
    args = ModelArgs(**arch, max_seq_len=values["seq_len"])
    try:
        args.validate()
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return args, values["seq_len"]


def load_model(name_or_file: str, seq_len: int | None = None) -> tuple[ModelArgs, int]:
    """(architecture, seq_len in tokens) of a zili preset by name or of a TOML model file; `seq_len` overrides
    the file's (presets: DEFAULT_SEQ_LEN, or their max_seq_len if smaller)."""
    if name_or_file in PRESETS:
        args = PRESETS[name_or_file]
        if args.vocab_size == 0:
            raise UserError(f"preset {name_or_file!r} takes its vocabulary from a tokenizer — write a model file "
                            "with vocab_size instead")
        return args, seq_len or min(DEFAULT_SEQ_LEN, args.max_seq_len)
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
    return _check_model(values, str(path))


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

    def layout_problem(self, layout: Layout) -> str | None:
        """Why this cluster cannot run `layout`, beyond the shared rules (zili.parallel.layout.problem): a tp
        group must stay inside a node (its all-reduces need the scale-up links), and the chip needs a peak in
        the layout's dtype. None if it can."""
        if layout.tp > self.per_node:
            return f"tp={layout.tp} spans more than one node of {self.per_node} chips — keep tp within a node"
        if not self.row.get(f"{layout.dtype}_tflops"):
            return f"chip {self.chip} has no {layout.dtype} peak — pick another --dtype"
        return None

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
        if key.endswith(("_tflops", "_gb", "_gbps", "_tbps")) or key in FRACTIONS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise UserError(f"{where}: {key} must be a non-negative number, got {value!r}")
    for key in ("hbm_gb", "scale_up_gbps", "scale_out_gbps"):
        if row[key] <= 0:
            raise UserError(f"{where}: {key} must be positive, got {row[key]}")
    for key in FRACTIONS:
        if key in row and not 0 < row[key] <= 1:
            raise UserError(f"{where}: {key} must be in (0, 1], got {row[key]}")
    return row


def load_cluster(name_or_file: str, count: int, per_node: int) -> Cluster:
    """A chip-table row by name or a TOML chip file, `count` chips, `per_node` per node."""
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
