"""`zili import-hf HF_DIR RUN_DIR`: a Hugging Face Qwen2 / Llama checkpoint -> a zili run directory.

Reads config.json, the safetensors weights (one file, or shards listed in model.safetensors.index.json)
and the tokenizer files; writes RUN_DIR/tokenizer/ and RUN_DIR/checkpoints/step-0000000/ (model weights in
fp32 through DCP, and meta.json with the architecture, the family and the source dtype, which export uses
to write the weights back in their original precision). Tensors are read one at a time, and
`HFWeights` can read just a slice of one (a rank's shard).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from zili import checkpoint
from zili.data.tokenizer import Tokenizer
from zili.errors import UserError
from zili.fsio import atomic_dir
from zili.interop.hf import args_from_config, hf_name, read_config, zili_name
from zili.models.transformer import Transformer, rope_table

INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
IGNORED = ("rotary_emb.inv_freq",)  # buffers some older checkpoints carry


def weight_files(hf_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: hf_dir / file for name, file in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise UserError(f"{path} is listed in {INDEX} but missing — download every shard")
        return files
    paths = sorted(hf_dir.glob("*.safetensors"))
    if not paths:
        raise UserError(f"no *.safetensors weights in {hf_dir} — zili reads safetensors checkpoints only")
    files = {}
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            files.update({name: path for name in f.keys()})
    return files


class HFWeights:
    """The tensors of a Hugging Face checkpoint by zili parameter name, read one region of one tensor at a
    time: `weights(name, shape, offsets=None, sizes=None)` -> fp32 tensor of shape `sizes` holding
    full[offsets[d] : offsets[d] + sizes[d]] (the whole tensor by default), where `shape` is the full
    shape config.json implies (UserError if the tensor is missing or of another shape). Through safetensors'
    slices only the region's bytes are copied out of the (memory-mapped) file, so a rank of a sharded
    model reads its shard and nothing else. `bytes_read` counts the tensor bytes read so far, in the
    checkpoint's dtype; `source_dtype` is that dtype (None before the first read)."""

    def __init__(self, hf_dir: Path, model: Transformer):
        self.hf_dir = Path(hf_dir)
        self.files = weight_files(self.hf_dir)
        names = {name for name, _ in model.named_parameters()}
        for name in self.files:
            if name.endswith(IGNORED) or (name == "lm_head.weight" and model.lm_head is None):
                continue
            try:
                if zili_name(name) in names:
                    continue
            except KeyError:
                pass
            raise UserError(f"unexpected tensor {name!r} in {hf_dir} — the checkpoint does not match its config.json")
        self.source_dtype: torch.dtype | None = None
        self.bytes_read = 0

    def __call__(self, name: str, shape, offsets=None, sizes=None) -> torch.Tensor:
        key = hf_name(name)
        if key not in self.files:
            raise UserError(f"tensor {key!r} is missing from {self.hf_dir} — the checkpoint is incomplete")
        shape = tuple(shape)
        if offsets is None or sizes is None:
            offsets, sizes = (0,) * len(shape), shape
        with safe_open(str(self.files[key]), framework="pt") as f:
            part = f.get_slice(key)
            found = tuple(part.get_shape())
            if found != shape:  # checked from the header, before reading anything
                raise UserError(f"tensor {key!r} has shape {found} but config.json implies {shape} — the "
                                "weights do not match the config")
            tensor = part[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
        self.bytes_read += tensor.numel() * tensor.element_size()
        self.source_dtype = self.source_dtype or tensor.dtype
        return tensor.float()


def load_hf_weights(model: Transformer, hf_dir: Path) -> torch.dtype:
    """Copy the checkpoint's tensors into `model`'s (materialised) parameters; return the source dtype."""
    weights = HFWeights(hf_dir, model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(weights(name, param.shape))
    return weights.source_dtype


def copy_tokenizer(hf_dir: Path, out: Path) -> Tokenizer:
    hf_dir = Path(hf_dir)
    if not (hf_dir / "tokenizer.json").is_file():
        raise UserError(f"{hf_dir / 'tokenizer.json'} not found — "
                        "zili needs the fast tokenizer file next to the weights")
    with atomic_dir(out) as tmp:
        for name in TOKENIZER_FILES:
            if (hf_dir / name).is_file():
                shutil.copy2(hf_dir / name, tmp / name)
        tokenizer = Tokenizer.load(tmp)  # a tokenizer that does not load is never committed
    return tokenizer


def import_hf(hf_dir: str | Path, run_dir: str | Path) -> Path:
    """Convert; return the checkpoint directory written."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir} is not a directory — pass a Hugging Face model directory")
    args, family = args_from_config(read_config(hf_dir))
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.rope.copy_(rope_table(args))
    source_dtype = load_hf_weights(model, hf_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(hf_dir, run_dir / "tokenizer")
    meta = {"model": args.to_dict(), "hf": {"family": family, "dtype": str(source_dtype).removeprefix("torch."),
                                            "source": str(hf_dir.resolve())}}
    return checkpoint.save_model(run_dir, 0, model, meta)
