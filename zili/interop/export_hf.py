"""`zili export-hf RUN_DIR OUT_DIR [--step N]`: a zili checkpoint -> a Hugging Face model directory.

Writes config.json (classic form: `rope_theta`, `rope_scaling`), generation_config.json, the weights as
model.safetensors — or shards of at most `max_shard_bytes` plus model.safetensors.index.json — and the
tokenizer files, into a temporary directory renamed to OUT_DIR when complete. Experts are written one
tensor per expert (the hub layout, see zili.interop.hf); the balancing bias stays fp32.

Streaming: the checkpoint is read one tensor at a time through DCP (which reads only that tensor's bytes,
whatever number of ranks wrote the checkpoint), converted and appended to the current shard; a full shard
is written and dropped. Peak host memory is about one shard plus one tensor, not the model (a stacked expert
tensor counts as one: all experts of one projection of one layer, in fp32).

Family: the one recorded at import (`meta.json` "hf"), else the first of llama, qwen2, qwen3, qwen3_moe and
deepseek_v3 that holds the architecture (`zili.interop.hf.family_for`; one line and exit 2 if none does).
Dtype: `auto` = the dtype of the imported weights (so import then export is bit-identical),
float32 for models trained from scratch (master weights are fp32).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from zili import checkpoint
from zili.data.tokenizer import Tokenizer
from zili.errors import UserError
from zili.fsio import atomic_dir, check_writable
from zili.interop.hf import config_from_args, family_for, family_problem, hf_name, hf_names, is_stacked, mtp_copies
from zili.interop.import_hf import model_tensors
from zili.models.args import ModelArgs
from zili.models.transformer import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_SHARD_BYTES = 5 * 10**9
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _tensors(args: ModelArgs) -> list[tuple[str, torch.Size]]:
    """(zili name, shape) of every checkpointed tensor — parameters and persistent buffers — in model order (built
    on the meta device: no memory)."""
    with torch.device("meta"):
        return list(model_tensors(Transformer(args)).items())


def _hf_tensors(path: Path, args: ModelArgs, dtype: torch.dtype):
    """(Hugging Face name, tensor in `dtype`) pairs, one zili tensor read at a time; a stacked expert tensor yields
    one tensor per expert (the hub layout)."""
    tensors = _tensors(args)
    shapes = dict(tensors)
    for name, shape in tensors:
        tensor = checkpoint.read_model_tensor(path, name, shape)
        if is_stacked(name):
            yield from ((hf, t.to(dtype).contiguous())
                        for hf, t in zip(hf_names(name, shape, args.n_layers), tensor.unbind(0)))
        elif name.endswith("e_score_correction_bias"):
            yield hf_name(name, None, args.n_layers), tensor  # fp32 in every release, whatever the weights' dtype
        else:
            yield hf_name(name, None, args.n_layers), tensor.to(dtype)
    for hf, name in mtp_copies(args.n_layers, args.mtp_depth).items():  # DeepSeek's layout repeats them there
        name = name if name in shapes else "embed.weight"  # tied: the head is the embedding
        yield hf, checkpoint.read_model_tensor(path, name, shapes[name]).to(dtype)


def _write_shards(tensors, out: Path, max_shard_bytes: int) -> dict[str, str]:
    """Write (hf name, tensor) pairs into safetensors files of at most `max_shard_bytes`; return the
    weight map (name -> file). Files are named model-0000K.safetensors, renamed once their count is known."""
    weight_map, shard, size, files = {}, {}, 0, []

    def flush():
        nonlocal shard, size
        if shard:
            file = f"part-{len(files):05d}.safetensors"
            save_file(shard, out / file, metadata={"format": "pt"})
            files.append((file, list(shard)))
            shard, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor
        size += nbytes
    flush()
    for k, (file, names) in enumerate(files):
        final = "model.safetensors" if len(files) == 1 else f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        (out / file).rename(out / final)
        weight_map.update({name: final for name in names})
    return weight_map


def export_hf(run_dir: str | Path, out_dir: str | Path, step: int | None = None, dtype: str = "auto",
              max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Convert checkpoint `step` (newest if None) of `run_dir`; return OUT_DIR."""
    run_dir, out = Path(run_dir), Path(out_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {str(run_dir)!r} not found — "
                        "pass the directory `zili train` or `zili import-hf` wrote")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file — pass a directory to write the Hugging Face model into")
    check_writable(out, "OUT_DIR")
    path = checkpoint.resolve(run_dir, step)
    meta = checkpoint.read_meta(path)
    args = ModelArgs(**meta["model"])
    source = meta.get("hf", {})
    family = source.get("family") or family_for(args)
    if problem := family_problem(args, family):
        raise UserError(f"the checkpoint cannot be written as {family}: {problem}")
    if dtype == "auto":
        dtype = source.get("dtype", "float32")
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)} — pass --dtype")
    tokenizer = Tokenizer.load(run_dir / "tokenizer")

    with atomic_dir(out) as tmp:
        _write_directory(tmp, run_dir, path, args, family, dtype, tokenizer, max_shard_bytes)
    return out


def _write_directory(tmp: Path, run_dir: Path, path: Path, args: ModelArgs, family: str, dtype: str,
                     tokenizer: Tokenizer, max_shard_bytes: int) -> None:
    """Everything OUT_DIR holds, written into `tmp`."""
    weight_map = _write_shards(_hf_tensors(path, args, DTYPES[dtype]), tmp, max_shard_bytes)
    if len(set(weight_map.values())) > 1:
        total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = config_from_args(args, family, dtype, tokenizer.eos_id)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    generation = run_dir / "tokenizer" / "generation_config.json"  # kept from an import, if any
    if generation.is_file():
        shutil.copy2(generation, tmp / "generation_config.json")
    else:
        (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": tokenizer.eos_id}, indent=2))
    for name in TOKENIZER_FILES:
        if (run_dir / "tokenizer" / name).is_file():
            shutil.copy2(run_dir / "tokenizer" / name, tmp / name)
