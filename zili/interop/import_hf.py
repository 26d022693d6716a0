"""`zili import-hf HF_DIR RUN_DIR`: a Hugging Face checkpoint of a family `zili.interop.hf` knows -> a zili run
directory.

Reads config.json, the safetensors weights (one file, or shards listed in model.safetensors.index.json)
and the tokenizer files; writes RUN_DIR/tokenizer/ and RUN_DIR/checkpoints/step-0000000/ (model weights in
fp32 through DCP, and meta.json with the architecture, the family and the source dtype, which export uses
to write the weights back in their original precision). Tensors are read one at a time, and
`HFWeights` can read just a slice of one (a rank's shard) — of a stacked expert tensor, just those experts.

Block-quantized FP8 checkpoints (DeepSeek-V3 as published: float8_e4m3fn weights with a float32
`weight_scale_inv` per block of `quantization_config.weight_block_size`, 128 x 128) are dequantized as they are
read, region by region: weight x its block's scale, in fp32. Their source dtype is recorded as bfloat16, the
dtype export writes them back in (zili does not re-quantize).

DeepSeek-V3's multi-token-prediction layer (`model.layers.{num_hidden_layers}.*`) is loaded into a model with
`mtp_depth` 1 (`import-hf --mtp-depth 1`, `--model.mtp_depth=1` with `--model.init=hf:DIR`) and otherwise skipped
with one info line on stderr; its copies of the embedding and the head are not read (zili shares them).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from zili import checkpoint
from zili.data.tokenizer import Tokenizer
from zili.errors import UserError
from zili.fsio import atomic_dir, check_writable
from zili.interop.hf import args_from_config, hf_names, is_stacked, mtp_copies, read_config
from zili.models.transformer import Transformer

INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
IGNORED = ("rotary_emb.inv_freq",)  # buffers some older checkpoints carry
FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))
SCALE_SUFFIX = "_scale_inv"


def open_weights(path: Path):
    """`safe_open` of one safetensors file; UserError for a file safetensors cannot read (cut short, corrupt)."""
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}) — it is cut short or corrupt: download it "
                        "again") from None


def weight_files(hf_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: hf_dir / file for name, file in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, or not an index
            raise UserError(f"{index} is not a valid index ({type(e).__name__}: {e}) — fix or re-download it") from None
        for path in set(files.values()):
            if not path.is_file():
                raise UserError(f"{path} is listed in {INDEX} but missing — download every shard")
        return files
    paths = sorted(hf_dir.glob("*.safetensors"))
    if not paths:
        raise UserError(f"no *.safetensors weights in {hf_dir} — zili reads safetensors checkpoints only")
    files = {}
    for path in paths:
        with open_weights(path) as f:
            files.update({name: path for name in f.keys()})
    return files


def model_tensors(model: Transformer) -> dict[str, torch.Size]:
    """Name -> shape of every tensor a checkpoint of `model` holds: parameters and persistent buffers (the
    experts' balancing bias)."""
    return {name: tensor.shape for name, tensor in model.state_dict(keep_vars=True).items()}


class HFWeights:
    """The tensors of a Hugging Face checkpoint by zili tensor name, read one region of one tensor at a
    time: `weights(name, shape, offsets=None, sizes=None)` -> fp32 tensor of shape `sizes` holding
    full[offsets[d] : offsets[d] + sizes[d]] (the whole tensor by default), where `shape` is the full
    shape config.json implies (UserError if the tensor is missing or of another shape). Through safetensors'
    slices only the region's bytes are copied out of the (memory-mapped) file, so a rank of a sharded
    model reads its shard and nothing else; a stacked expert tensor is read expert by expert. `bytes_read`
    counts the tensor bytes read so far, in the checkpoint's dtype; `source_dtype` is that dtype (None before the
    first read; bfloat16 for a block-quantized FP8 checkpoint)."""

    def __init__(self, hf_dir: Path, model: Transformer):
        self.hf_dir = Path(hf_dir)
        self.files = weight_files(self.hf_dir)
        config = read_config(self.hf_dir)
        self.block = tuple((config.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
        self.n_layers = model.args.n_layers
        expected = {hf for name, shape in model_tensors(model).items() for hf in hf_names(name, shape, self.n_layers)}
        copies = mtp_copies(self.n_layers, model.args.mtp_depth)
        # DeepSeek-V3 keeps its multi-token-prediction layers after the last block: skipped unless the model has them
        mtp_prefix = (f"model.layers.{self.n_layers}."
                      if config.get("num_nextn_predict_layers") and not model.args.mtp_depth else None)
        skipped = 0
        for name in self.files:
            if name.endswith(IGNORED) or (name == "lm_head.weight" and model.lm_head is None) or name in copies:
                continue
            if name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) in expected:
                continue
            if mtp_prefix and name.startswith(mtp_prefix):
                skipped += 1
                continue
            if name not in expected:
                raise UserError(_unexpected(name, model.args, hf_dir))
        if skipped:
            print(f"info: skipping the multi-token-prediction layer ({mtp_prefix}*, {skipped} tensors) — "
                  "model.mtp_depth=1 loads and trains it", file=sys.stderr)
        self._dtype: torch.dtype | None = None  # of the first tensor read
        self._fp8 = False  # whether any tensor read was block-quantized
        self.bytes_read = 0

    @property
    def source_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self._fp8 else self._dtype

    def __call__(self, name: str, shape, offsets=None, sizes=None) -> torch.Tensor:
        shape = tuple(shape)
        if offsets is None or sizes is None:
            offsets, sizes = (0,) * len(shape), shape
        keys = hf_names(name, shape, self.n_layers)
        if not is_stacked(name):
            return self._read(keys[0], shape, offsets, sizes)
        keys = keys[offsets[0]: offsets[0] + sizes[0]]
        return torch.stack([self._read(key, shape[1:], offsets[1:], sizes[1:]) for key in keys])

    def _read(self, key: str, shape: tuple, offsets, sizes) -> torch.Tensor:
        """Region offsets/sizes of Hugging Face tensor `key` of `shape`, dequantized if FP8, as fp32."""
        if key not in self.files:
            raise UserError(f"tensor {key!r} is missing from {self.hf_dir} — the checkpoint is incomplete or does not "
                            "match its config.json")
        region = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
        with open_weights(self.files[key]) as f:
            part = f.get_slice(key)
            found = tuple(part.get_shape())
            if found != shape:  # checked from the header, before reading anything
                raise UserError(f"tensor {key!r} has shape {found} but config.json implies {shape} — the "
                                "weights do not match the config")
            tensor = part[region]
        self.bytes_read += tensor.numel() * tensor.element_size()
        if tensor.dtype in FP8_DTYPES:
            self._fp8 = True
            return self._dequantize(key, tensor, offsets, sizes)
        self._dtype = self._dtype or tensor.dtype
        return tensor.float()

    def _dequantize(self, key: str, tensor: torch.Tensor, offsets, sizes) -> torch.Tensor:
        """An FP8 region times the scales of the blocks its elements lie in (`weight_scale_inv`), in fp32."""
        scale_key = key + SCALE_SUFFIX
        if scale_key not in self.files or tensor.dim() != 2:
            raise UserError(f"{key!r} is stored in {tensor.dtype} without a 2-D block scale {scale_key!r} — zili "
                            "reads block-quantized FP8 checkpoints (DeepSeek-V3's format) only")
        with open_weights(self.files[scale_key]) as f:
            scale = f.get_tensor(scale_key).float()
        self.bytes_read += scale.numel() * scale.element_size()
        rows = torch.arange(offsets[0], offsets[0] + sizes[0]) // self.block[0]
        cols = torch.arange(offsets[1], offsets[1] + sizes[1]) // self.block[1]
        return tensor.float() * scale[rows][:, cols]


def _unexpected(name: str, args, hf_dir: Path) -> str:
    """The one-line error for a tensor of `hf_dir` that the model of config.json has no place for."""
    parts = name.split(".")
    if parts[3:5] == ["mlp", "experts"] and len(parts) > 5 and parts[5].isdigit():
        return (f"{hf_dir} holds expert {parts[5]} in layer {parts[2]} but its config.json has "
                f"{args.n_routed_experts} routed experts — the checkpoint does not match its config")
    return f"unexpected tensor {name!r} in {hf_dir} — the checkpoint does not match its config.json"


def load_hf_weights(model: Transformer, hf_dir: Path) -> torch.dtype:
    """Copy the checkpoint's tensors into `model`'s (materialised) parameters and persistent buffers; return the
    source dtype."""
    weights = HFWeights(hf_dir, model)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            tensor.copy_(weights(name, tensor.shape))
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


def import_hf(hf_dir: str | Path, run_dir: str | Path, mtp_depth: int = 0) -> Path:
    """Convert (with the multi-token-prediction layer when `mtp_depth` is 1); return the checkpoint directory
    written."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir} is not a directory — pass a Hugging Face model directory")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file — pass a directory to write the run into")
    check_writable(run_dir, "RUN_DIR")
    args, family = args_from_config(read_config(hf_dir))
    args.mtp_depth = mtp_depth
    args.validate()
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_buffers()
    source_dtype = load_hf_weights(model, hf_dir)
    copy_tokenizer(hf_dir, run_dir / "tokenizer")  # first: without tokenizer.json nothing is written
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.to_dict(), "hf": {"family": family, "dtype": str(source_dtype).removeprefix("torch."),
                                            "source": str(hf_dir.resolve())}}
    return checkpoint.save_model(run_dir, 0, model, meta)
