"""The reasoning demo's task: adding two multi-digit numbers, with a checkable answer, generated from a seed.

A problem is "What is A + B?" for A and B of `digits` digits. Its worked answer adds column by column from the
right, the way it is taught, then states the sum:

    <think>2+8=10, write 0 carry 1. 7+5+1=13, write 3 carry 1. 4+3+1=8, write 8.</think> Answer: 830

so a small model can learn the procedure from examples (fine-tuning), and a reward can check the final answer
(zili.train.rewards.exact_answer reads the text after "Answer:") — which is what reinforcement learning then
optimises. `write_task` lays out one task directory: worked conversations for fine-tuning, prompts with answers
for GRPO, and held-out prompts with answers (three disjoint sets of problems), plus a tokenizer trained on the
task's text with the chat markers as single tokens and numbers split into digits.

The sloppy teacher (`slip` > 0; the reasoning demo uses 0.6): the worked conversations drop each carry they owe
with probability `slip` — `7+8=15, write 5 carry 1. 4+3=7, write 7.</think> Answer: 75` for 47 + 38 — and state
the sum their columns give, so a sum with a carry is usually demonstrated wrong. A model fine-tuned on them learns
the mistake with the procedure: its greedy answer drops the carry, while a share of its sampled answers keep it.
The prompts' answers (for the reward and the held-out accuracy) are always the true sums, so reinforcement
learning with that reward can improve beyond the imperfect demonstrations, which is what the demo shows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from zili.data.chat import CHAT_TOKENS
from zili.data.tokenizer import train_bpe
from zili.fsio import atomic_write_text

SFT_FILE, RL_FILE, HELDOUT_FILE, TOKENIZER_DIR = "sft.jsonl", "rl_prompts.jsonl", "heldout.jsonl", "tokenizer"


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def worked_answer(a: int, b: int, forget: random.Random | None = None, slip: float = 0.0) -> str:
    """The column-by-column reasoning and its sum (module doc). With `forget` (a seeded generator) and `slip` > 0,
    the sloppy teacher's answer: each column that has a carry in drops it with probability `slip` (it writes
    `4+3=7` where `4+3+1=8` is due) and carries on from there, so its stated sum is wrong by that carry."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    steps, carry, digits = [], 0, []
    for i in range(max(len(xs), len(ys))):
        x, y = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
        if carry and forget is not None and forget.random() < slip:
            carry = 0
        total = x + y + carry
        digits.append(total % 10)
        new_carry = total // 10
        steps.append(f"{x}+{y}" + ("+1" if carry else "") + f"={total}, write {total % 10}"
                     + (" carry 1" if new_carry else "") + ".")
        carry = new_carry
    if carry:
        steps.append("write the carry 1.")
        digits.append(1)
    return f"<think>{' '.join(steps)}</think> Answer: {int(''.join(map(str, reversed(digits))))}"


def problems(seed: int, count: int, digits: int) -> list[tuple[int, int]]:
    """`count` distinct problems (a, b) of `digits`-digit numbers, in a seeded random order."""
    rng = random.Random(seed)
    low, high = 10 ** (digits - 1), 10**digits - 1
    seen: set[tuple[int, int]] = set()
    while len(seen) < count:
        seen.add((rng.randint(low, high), rng.randint(low, high)))
    out = sorted(seen)
    rng.shuffle(out)
    return out


def write_task(directory: str | Path, seed: int = 0, digits: int = 3, n_sft: int = 4000, n_rl: int = 2000,
               n_heldout: int = 400, vocab_size: int = 320, slip: float = 0.0) -> Path:
    """The task directory (module doc): `sft.jsonl` ({"messages": [user, assistant]}), `rl_prompts.jsonl` and
    `heldout.jsonl` ({"prompt", "answer"}), `tokenizer/`. The same arguments give the same files. `slip` > 0:
    the worked conversations are the sloppy teacher's (`worked_answer`: each carry dropped with that
    probability, from a generator seeded by `seed`); the answers of the prompts stay the true sums."""
    if not 0 <= slip <= 1:
        raise ValueError(f"slip is a probability, got {slip}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    every = problems(seed, n_sft + n_rl + n_heldout, digits)
    sft, rl, heldout = every[:n_sft], every[n_sft: n_sft + n_rl], every[n_sft + n_rl:]
    forget = random.Random(f"slips-{seed}") if slip else None
    conversations = [{"messages": [{"role": "user", "content": question(a, b)},
                                   {"role": "assistant", "content": worked_answer(a, b, forget, slip)}]}
                     for a, b in sft]
    atomic_write_text(directory / SFT_FILE, "".join(json.dumps(c) + "\n" for c in conversations))
    for name, part in ((RL_FILE, rl), (HELDOUT_FILE, heldout)):
        atomic_write_text(directory / name, "".join(json.dumps({"prompt": question(a, b), "answer": str(a + b)})
                                                    + "\n" for a, b in part))
    texts = [m["content"] for c in conversations for m in c["messages"]] + ["user", "assistant", "system"]
    train_bpe(texts, vocab_size, special_tokens=CHAT_TOKENS, individual_digits=True).save(directory / TOKENIZER_DIR)
    return directory
