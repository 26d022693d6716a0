"""Rewards for GRPO: the built-ins, loading a user's function from the config, and scoring a batch of samples.

A reward is any callable `fn(prompt: str, completion: str, **fields) -> float`: `prompt` is the prompt as the
model saw it, `completion` the sampled text, `fields` the prompt record's other fields (e.g. `answer`). It
should accept (and may ignore) fields it does not use, hence the `**fields`.

Built-ins (config names in quotes):
- "exact_answer" — 1.0 when the completion's final answer equals the sample's `answer` field, else 0.0. See
  `extract_answer` and `normalize_answer` for the rule.
- "format" — 1.0 when the completion is `<think>REASONING</think>ANSWER`, else 0.0. See `format_reward`.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal, InvalidOperation

import torch

from zili.errors import UserError

RewardFn = Callable[..., float]

_BOXED = "\\boxed{"
_MARKER = re.compile(r"answer:|answer is", re.IGNORECASE)
# A number not glued to a word or a decimal point before it: "-12", "1,234", "3.5"; "x2" and "v1.2" don't count
# (the "1.2" of "v1.2" is not matched from its "2" either, thanks to the "." in the look-behind)
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?")
_NUMERIC = re.compile(r"[+-]?\d+(?:,\d{3})*(?:\.\d+)?|[+-]?\.\d+")
_THINK = re.compile(r"\s*<think>(?P<reasoning>.*?)</think>(?P<answer>.*)", re.DOTALL)


def _last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}`, braces balanced (so `\\boxed{\\frac{1}{2}}` gives
    `\\frac{1}{2}`); None when there is none or it is never closed."""
    start = text.rfind(_BOXED)
    while start >= 0:
        depth, i = 1, start + len(_BOXED)
        while i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start + len(_BOXED) : i]
            i += 1
        start = text.rfind(_BOXED, 0, start)  # unclosed: try the one before
    return None


def extract_answer(completion: str) -> str | None:
    """The final answer stated in `completion`, by the first rule that applies:
    1. the content of the last `\\boxed{...}`;
    2. else the rest of the line after the last "Answer:" or "answer is" (any case);
    3. else the last number (optional minus sign, thousands commas and decimals: "-1,234.5").
    None when no rule applies (or the marker of rule 2 is followed by nothing)."""
    boxed = _last_boxed(completion)
    if boxed is not None:
        return boxed
    markers = list(_MARKER.finditer(completion))
    if markers:
        rest = completion[markers[-1].end() :].split("\n", 1)[0]
        return rest if rest.strip() else None
    numbers_found = _NUMBER.findall(completion)
    return numbers_found[-1] if numbers_found else None


def normalize_answer(text: str) -> str:
    """The form answers are compared in: whitespace removed; then, repeatedly, surrounding `$`, `**` (Markdown
    bold) and a trailing "." dropped; then a number is written canonically by value — commas between digit
    groups, a leading "+", trailing zeros after the point and a trailing ".0" go ("1,234.50" -> "1234.5",
    "3.0" -> "3", "-0" -> "0"). Anything else is compared as it is, case included (math is case-sensitive)."""
    s = "".join(text.split())
    previous = None
    while s != previous:
        previous = s
        s = s.strip("$").removeprefix("**").removesuffix("**").removesuffix(".")
    if _NUMERIC.fullmatch(s):
        try:
            value = Decimal(s.replace(",", ""))
        except InvalidOperation:
            return s
        if value == 0:
            return "0"
        value = value.normalize()
        return format(value, "f")
    return s


def exact_answer(prompt: str, completion: str, answer: object = None, **fields) -> float:
    """1.0 when the final answer of `completion` (`extract_answer`) equals the reference `answer` (a field of
    the sample: text or a number) once both are normalised (`normalize_answer`), else 0.0. No answer found is
    0.0. A sample without an `answer` field is an error (the prompt set lacks the reference)."""
    if answer is None:
        raise ValueError("exact_answer needs the reference in the sample's 'answer' field")
    found = extract_answer(completion)
    if found is None:
        return 0.0
    return 1.0 if normalize_answer(found) == normalize_answer(str(answer)) else 0.0


def format_reward(prompt: str, completion: str, **fields) -> float:
    """1.0 when the completion is, after optional leading whitespace, `<think>` + reasoning + `</think>` +
    answer, where the reasoning and the answer each hold some non-whitespace text and neither holds another
    `<think>` or `</think>` tag; else 0.0. When the prompt itself ends with `<think>` (chat templates of
    reasoning models open the block for the model, e.g. DeepSeek-R1's), the completion is read as continuing
    it: it then starts with the reasoning, not the tag."""
    text = completion
    if prompt.rstrip().endswith("<think>") and not completion.lstrip().startswith("<think>"):
        text = "<think>" + completion
    match = _THINK.fullmatch(text)
    if match is None:
        return 0.0
    reasoning, answer = match["reasoning"], match["answer"]
    if not reasoning.strip() or not answer.strip():
        return 0.0
    if any(tag in part for part in (reasoning, answer) for tag in ("<think>", "</think>")):
        return 0.0
    return 1.0


BUILTINS: dict[str, RewardFn] = {"exact_answer": exact_answer, "format": format_reward}


def _one_line(text: str, limit: int = 300) -> str:
    """`text` on one line (whitespace runs collapsed), cut to `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_reward(spec: str) -> RewardFn:
    """The reward named by `spec`: a built-in name ("exact_answer", "format") or "module:function" (the function
    may be a dotted attribute path, "module:Class.method"; the module is imported from sys.path, the working
    directory included when zili is started as a command). A spec that names no callable is a UserError."""
    spec = spec.strip()
    if spec in BUILTINS:
        return BUILTINS[spec]
    fix = f"name a built-in ({', '.join(BUILTINS)}) or a function as 'module:function'"
    module_name, colon, attr = (part.strip() for part in spec.partition(":"))
    if not colon or not module_name or not attr:
        raise UserError(f"reward {spec!r} is neither a built-in nor 'module:function' — {fix}")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module's own code raised while importing
        raise UserError(_one_line(f"reward {spec!r}: cannot import module {module_name!r} "
                                  f"({type(e).__name__}: {e}) — put its directory on PYTHONPATH or fix the "
                                  "module")) from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r} — check the "
                            "function's name")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"reward {spec!r} is a {type(obj).__name__}, not a function — name a function "
                        "fn(prompt, completion, **fields) -> float")
    return obj


def _sample_error(name: str, index: int, sample: object, what: str,
                  fix: str = "a reward must return a finite number for every sample") -> UserError:
    prompt = sample.get("prompt") if isinstance(sample, Mapping) else None
    about = f" (prompt {_one_line(prompt, 60)!r})" if isinstance(prompt, str) else ""
    return UserError(_one_line(f"reward {name!r}, sample {index}{about}: {what} — {fix}", limit=500))


def score(reward_fn: RewardFn, name: str, samples: Iterable[Mapping]) -> torch.Tensor:
    """Rewards (N,) fp32 of N samples: `reward_fn(prompt, completion, **fields)` for each sample, a mapping with
    "prompt", "completion" and any other fields. `name` (the config's spec) names the function in errors.

    A reward must be a finite real number: int, float or a numpy scalar; a bool counts as 1.0 / 0.0 (a
    predicate "is it right?" is a natural reward). Anything else — an exception raised by the function, None,
    a string, a tensor, NaN or ±inf (which would turn its whole group's advantages into NaN) — is a UserError of
    one line naming the function, the sample's 0-based index and its prompt, and the exception's message."""
    values = []
    for index, sample in enumerate(samples):
        if not isinstance(sample, Mapping) or "prompt" not in sample or "completion" not in sample:
            raise _sample_error(name, index, sample, "not a mapping with 'prompt' and 'completion'",
                                "each sample needs both fields")
        fields = {k: v for k, v in sample.items() if k not in ("prompt", "completion")}
        try:
            value = reward_fn(sample["prompt"], sample["completion"], **fields)
        except Exception as e:
            raise _sample_error(name, index, sample, f"raised {type(e).__name__}: {e}") from None
        if not isinstance(value, numbers.Real):
            raise _sample_error(name, index, sample, f"returned {type(value).__name__} {value!r:.40}, not a number")
        value = float(value)
        if not math.isfinite(value):
            raise _sample_error(name, index, sample, f"returned {value}")
        values.append(value)
    return torch.tensor(values, dtype=torch.float32)
