"""`zili chat RUN_DIR|HF_DIR`: a multi-turn conversation with a model, through its tokenizer's chat template.

The model is a run directory's newest (or chosen) checkpoint, or a Hugging Face directory of a family zili
knows (config.json, safetensors, tokenizer.json); the template is the tokenizer's (zili.data.chat: its own, or
zili's default ChatML). Each turn renders the whole conversation so far with the generation prompt, samples
the reply token by token, and prints it as it comes. A reply ends at the end-of-sequence token, at the
template's end-of-turn marker (`end_of_turn`: what the template writes right after an assistant message, e.g.
`<|im_end|>`; a single token id when the tokenizer has one, else matched in the decoded text), or after
`max_new_tokens`. The marker is not printed and not kept in the history.

A terminal on stdin: "you> " prompts, Ctrl-C ends a reply early (the conversation goes on with what was said),
Ctrl-C or Ctrl-D at the prompt ends the conversation. Any other stdin (a pipe, a file): each line is one user
turn, and each answer is printed followed by a newline — scriptable. The sampling seed of turn i is seed + i.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from zili.accel import get_accelerator
from zili.data.chat import ChatTemplate, encode_prompt, load_chat_template, render
from zili.data.tokenizer import Tokenizer
from zili.errors import UserError
from zili.infer.generate import stream
from zili.infer.run import load_run
from zili.interop.hf import args_from_config, read_config
from zili.interop.import_hf import load_hf_weights
from zili.models.transformer import Transformer

PROBE = "\x00zili-end-of-turn-probe\x00"  # an assistant message no template writes by itself


@dataclass(frozen=True)
class Sampling:
    """How replies are drawn: temperature (0 = greedy), top-p, at most `max_new_tokens` tokens, seed."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 512
    seed: int = 0


def load_chat_model(path: str | Path, step: int | None = None, device: str = "auto"
                    ) -> tuple[Transformer, Tokenizer, ChatTemplate]:
    """(model in eval mode on the device, tokenizer, chat template) of a run directory or a Hugging Face
    directory."""
    path = Path(path)
    if (path / "checkpoints").is_dir() or (path / "config.toml").is_file():
        model, tokenizer = load_run(path, step, device)
        return model, tokenizer, load_chat_template(path / "tokenizer")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is neither a zili run directory nor a Hugging Face model directory (no "
                        "checkpoints/ and no config.json) — pass the directory `zili train` or `save_pretrained` "
                        "wrote")
    args, _ = args_from_config(read_config(path))
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=get_accelerator(device).device)
    model.init_weights()
    load_hf_weights(model, path)
    return model.eval(), Tokenizer.load(path), load_chat_template(path)


def end_of_turn(template: ChatTemplate) -> str:
    """What the template writes right after an assistant message's content, up to the next whitespace (e.g.
    `<|im_end|>`, `<|eot_id|>`); "" when it writes nothing there."""
    text = render(template, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE}])
    after = text[text.index(PROBE) + len(PROBE):] if PROBE in text else ""
    return after.split()[0] if after.split() else ""


def reply(model: Transformer, tokenizer: Tokenizer, template: ChatTemplate, messages: list[dict], sampling: Sampling,
          out: TextIO, seed: int) -> str:
    """Sample the assistant's next message after `messages`, printing it to `out` as it comes; returns it (without
    the end-of-turn marker). Ctrl-C ends it early, keeping what was printed."""
    marker = end_of_turn(template)
    marker_ids = tokenizer.backend.encode(marker, add_special_tokens=False).ids if marker else []
    stop_ids = marker_ids if len(marker_ids) == 1 else []
    prompt = encode_prompt(tokenizer, template, messages)
    new: list[int] = []
    shown = ""

    def text_so_far() -> str:
        text = tokenizer.decode(new)
        return text[: text.index(marker)] if marker and marker in text else text

    try:
        for token in stream(model, prompt, sampling.max_new_tokens, sampling.temperature, sampling.top_p, seed,
                            eos_id=tokenizer.eos_id, stop_ids=stop_ids):
            if token == tokenizer.eos_id or token in stop_ids:
                break
            new.append(token)
            text = tokenizer.decode(new)
            if marker and marker in text:  # the marker spelled with several tokens
                break
            # hold back what could be the start of the marker, and an incomplete multi-byte character
            safe = len(text) - (len(marker) - 1 if marker else 0) - text.endswith("\ufffd")
            if safe > len(shown):
                out.write(text[len(shown):safe])
                out.flush()
                shown = text[:safe]
        final = text_so_far()
        out.write(final[len(shown):])
        shown = final
    except KeyboardInterrupt:
        final = text_so_far()
        out.write(final[len(shown):] + " [stopped]")
        shown = final
    out.flush()
    return shown


def chat(path: str | Path, sampling: Sampling, system: str | None = None, step: int | None = None,
         device: str = "auto", stdin: TextIO | None = None, out: TextIO | None = None) -> list[dict]:
    """Run the conversation (see the module doc); returns its messages."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    model, tokenizer, template = load_chat_model(path, step, device)
    messages = [{"role": "system", "content": system}] if system else []
    interactive = stdin.isatty()
    turn = 0
    while True:
        try:
            line = input("you> ") if interactive else stdin.readline()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            break
        if not interactive and not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        if interactive:
            out.write("zili> ")
        answer = reply(model, tokenizer, template, messages, sampling, out, sampling.seed + turn)
        out.write("\n")
        out.flush()
        messages.append({"role": "assistant", "content": answer})
        turn += 1
    return messages
