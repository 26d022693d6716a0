"""Text generation with a KV cache: greedy (temperature 0, deterministic) or temperature + top-p sampling.

Contract: `generate(model, prompt_ids, ...)` returns the new token ids (prompt excluded), stopping at
`max_new_tokens`, at a stop id (`eos_id`, `stop_ids`; kept as the last token), or at the model's max_seq_len.
With the same seed the same tokens come back. `stream` yields the same tokens one at a time, as they are
chosen. `sample_group` draws n completions of one prompt at once (a batch of n rows sharing the prompt's
positions, one cache): what reinforcement learning samples for each prompt.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from zili.models.transformer import Transformer


def pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """The next token of each row of (n, vocab) logits: (n,) int64 on the CPU. Temperature 0 is greedy; top-p
    keeps the smallest set of most likely tokens whose probability reaches `top_p`."""
    logits = logits.float().cpu()
    if temperature <= 0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, choice)[:, 0]


def _budget(model: Transformer, prompt_ids: list[int], max_new_tokens: int) -> int:
    if not prompt_ids:
        raise ValueError("the prompt must contain at least one token")
    return max(0, min(max_new_tokens, model.args.max_seq_len - len(prompt_ids)))


@torch.no_grad()
def stream(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
           top_p: float = 1.0, seed: int = 0, eos_id: int | None = None, stop_ids: Iterable[int] = (),
           use_cache: bool = True) -> Iterator[int]:
    """The new token ids after `prompt_ids`, yielded one at a time. `use_cache=False` recomputes the whole
    sequence at every step (the reference the KV cache must match)."""
    stops = set(stop_ids) | ({eos_id} if eos_id is not None else set())
    budget = _budget(model, prompt_ids, max_new_tokens)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    generator = torch.Generator(device="cpu").manual_seed(seed)
    cache = model.new_cache(1, len(prompt_ids) + budget, device, dtype) if use_cache else None
    ids, pos = list(prompt_ids), 0  # pos: positions already in the cache
    # compiled blocks run eagerly here: a KV cache at ever-changing positions would recompile them
    with torch.compiler.set_stance("force_eager"):
        for _ in range(budget):
            if cache is not None:
                logits = model(torch.tensor([ids[pos:]], device=device), start_pos=pos, cache=cache)
                pos = len(ids)
            else:
                logits = model(torch.tensor([ids], device=device))
            token = int(pick(logits[:, -1], temperature, top_p, generator)[0])
            ids.append(token)
            yield token
            if token in stops:
                return


def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_id: int | None = None, use_cache: bool = True,
             stop_ids: Iterable[int] = ()) -> list[int]:
    """New token ids after `prompt_ids` (see `stream`)."""
    return list(stream(model, prompt_ids, max_new_tokens, temperature, top_p, seed, eos_id, stop_ids, use_cache))


@torch.no_grad()
def sample_group(model: Transformer, prompt_ids: list[int], n: int, max_new_tokens: int, temperature: float,
                 top_p: float, generator: torch.Generator, stop_ids: Iterable[int] = (),
                 early_stop: bool = True) -> list[list[int]]:
    """`n` completions of one prompt, drawn together (`sample_rows` of `n` copies of it)."""
    return sample_rows(model, [prompt_ids] * n, max_new_tokens, temperature, top_p, generator, stop_ids, early_stop)


@torch.no_grad()
def sample_rows(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                top_p: float, generator: torch.Generator, stop_ids: Iterable[int] = (),
                early_stop: bool = True) -> list[list[int]]:
    """One completion of each of `prompts` (all of one length, so no padding), drawn together as the rows of one
    batch with one KV cache: each the new ids up to and including its first stop id, or `max_new_tokens` (or the
    model's max_seq_len) of them. Draws from `generator` (CPU), so a generator seeded alike gives the same
    completions; temperature 0 is greedy. `early_stop=False` runs every step even when all rows have stopped (a
    sharded model's ranks must run as many forwards as each other)."""
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("sample_rows needs prompts of one length")
    n = len(prompts)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.int64)
    budget = _budget(model, prompts[0], max_new_tokens)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    cache = model.new_cache(n, len(prompts[0]) + budget, device, dtype)
    tokens = torch.tensor(prompts, device=device)
    out = torch.empty(n, budget, dtype=torch.int64)
    done = torch.zeros(n, dtype=torch.bool)
    lengths = torch.full((n,), budget, dtype=torch.int64)
    pos = 0
    with torch.compiler.set_stance("force_eager"):
        for step in range(budget):
            logits = model(tokens, start_pos=pos, cache=cache)
            pos += tokens.shape[1]
            chosen = pick(logits[:, -1], temperature, top_p, generator)
            out[:, step] = chosen
            stopped = torch.isin(chosen, stops) & ~done
            lengths[stopped] = step + 1
            done |= stopped
            if early_stop and bool(done.all()):
                break
            tokens = chosen[:, None].to(device)
    return [out[i, : int(lengths[i])].tolist() for i in range(n)]
