"""Text generation with a KV cache: greedy (temperature 0, deterministic) or temperature + top-p sampling.

Contract: `generate(model, prompt_ids, ...)` returns the new token ids (prompt excluded), stopping at
`max_new_tokens`, at `eos_id`, or at the model's max_seq_len. With the same seed the same tokens come back.
"""

from __future__ import annotations

import torch

from zili.models.transformer import Transformer


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Choose the next token from the last position's logits (vocab,)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p  # smallest set reaching top_p
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_id: int | None = None, use_cache: bool = True) -> list[int]:
    """New token ids after `prompt_ids`. `use_cache=False` recomputes the whole sequence at every step
    (the reference the KV cache must match)."""
    if not prompt_ids:
        raise ValueError("the prompt must contain at least one token")
    # compiled blocks run eagerly here: a KV cache at ever-changing positions would recompile them
    with torch.compiler.set_stance("force_eager"):
        return _generate(model, prompt_ids, max_new_tokens, temperature, top_p, seed, eos_id, use_cache)


def _generate(model, prompt_ids, max_new_tokens, temperature, top_p, seed, eos_id, use_cache) -> list[int]:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    generator = torch.Generator(device="cpu").manual_seed(seed)
    budget = min(max_new_tokens, model.args.max_seq_len - len(prompt_ids))
    cache = model.new_cache(1, len(prompt_ids) + max(budget, 0), device, dtype) if use_cache else None
    ids = list(prompt_ids)
    new: list[int] = []
    pos = 0  # positions already in the cache
    for _ in range(max(budget, 0)):
        if cache is not None:
            logits = model(torch.tensor([ids[pos:]], device=device), start_pos=pos, cache=cache)
            pos = len(ids)
        else:
            logits = model(torch.tensor([ids], device=device))
        token = _pick(logits[0, -1].cpu(), temperature, top_p, generator)
        ids.append(token)
        new.append(token)
        if eos_id is not None and token == eos_id:
            break
    return new
