"""Load a trained run for inference: model from its newest (or a chosen) checkpoint, plus its tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from zili import checkpoint
from zili.accel import get_accelerator
from zili.data.tokenizer import Tokenizer
from zili.errors import UserError
from zili.infer.generate import generate
from zili.models.args import ModelArgs
from zili.models.transformer import Transformer


def load_run(run_dir: str | Path, step: int | None = None, device: str = "auto") -> tuple[Transformer, Tokenizer]:
    """The model (fp32, eval mode, on the device) and tokenizer of a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {str(run_dir)!r} not found — pass the directory `zili train` wrote")
    path = checkpoint.resolve(run_dir, step)
    args = ModelArgs(**checkpoint.read_meta(path)["model"])
    accel = get_accelerator(device)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=accel.device)
    model.init_weights()
    checkpoint.load_model(path, model)
    model.eval()
    return model, Tokenizer.load(run_dir / "tokenizer")


def generate_text(run_dir, prompt: str, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                  step: int | None = None, device: str = "auto") -> str:
    """Prompt plus its continuation, decoded."""
    model, tokenizer = load_run(run_dir, step, device)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UserError("the prompt is empty — pass some text with --prompt")
    new = generate(model, ids, max_new_tokens, temperature, top_p, seed, eos_id=tokenizer.eos_id)
    return tokenizer.decode(ids + new)
