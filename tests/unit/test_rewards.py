"""GRPO rewards: answer extraction, the built-ins, loading a reward from its spec, and scoring errors."""

import math

import numpy as np
import pytest
import torch

from zili.errors import UserError
from zili.train.rewards import exact_answer, extract_answer, format_reward, load_reward, normalize_answer, score


@pytest.mark.parametrize("completion, expected", [
    ("so we get \\boxed{42}. Answer: 7", "42"),  # boxed wins over every other rule
    ("first \\boxed{1}, then \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),  # the last one, braces balanced
    ("\\boxed{3} and an unclosed \\boxed{4", "3"),
    ("12 apples and 5 pears.\nAnswer: 17\nthanks 99", " 17"),  # the rest of the marker's line
    ("I think the Answer is 8; no, the answer is 9.", " 9."),
    ("5 + 7 = 12, minus 20 gives -8", "-8"),  # the last number, sign included
    ("total 1,234,567 items", "1,234,567"),
    ("pi is about 3.14", "3.14"),
    ("version v1.2 of x2", None),  # digits glued to a word are not numbers
    ("no idea", None),
    ("Answer:   \nlater 5", None),  # a marker followed by nothing: no answer, not the number after it
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize("text, expected", [
    ("1,234", "1234"), ("3.0", "3"), ("3.50", "3.5"), ("+7", "7"), ("-0", "0"), ("100", "100"),
    (" 42. ", "42"), ("$-5$", "-5"), ("**12**", "12"), ("x + 1", "x+1"), ("\\frac {1}{2}", "\\frac{1}{2}"),
    ("1,23", "1,23"),  # not a thousands grouping: left as text
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("completion, answer, reward", [
    ("<think>6*7</think> \\boxed{42}", "42", 1.0),
    ("The answer is 1,000.", 1000, 1.0),  # reference given as a number
    ("Answer: 2.0", "2", 1.0),
    ("Answer: 2.5", 2.5, 1.0),
    ("we end at -3", "-3", 1.0),
    ("we end at 3", "-3", 0.0),
    ("the result is 12 and then 13", "12", 0.0),  # the last number counts
    ("I do not know", "5", 0.0),  # no answer at all
    ("Answer: x^2 + 1", "x^2+1", 1.0),
])
def test_exact_answer(completion, answer, reward):
    assert exact_answer("prompt", completion, answer=answer, source="gsm8k") == reward


def test_exact_answer_needs_the_reference():
    with pytest.raises(ValueError, match="'answer' field"):
        exact_answer("p", "42")


@pytest.mark.parametrize("prompt, completion, reward", [
    ("Q", "<think>6 times 7</think>\n42", 1.0),
    ("Q", "  <think>\nlong\nreasoning\n</think> The answer is \\boxed{42}.", 1.0),
    ("Q<|assistant|><think>\n", "6 times 7</think>42", 1.0),  # the template opened the block
    ("Q<|assistant|><think>\n", "<think>6 times 7</think>42", 1.0),
    ("Q", "6 times 7</think>42", 0.0),  # no opening tag (and the prompt did not open it)
    ("Q", "<think>6 times 7</think>", 0.0),  # no answer
    ("Q", "<think>   </think>42", 0.0),  # no reasoning
    ("Q", "42 <think>6 times 7</think>", 0.0),  # answer before the reasoning
    ("Q", "<think>a</think>b</think>c", 0.0),  # a stray closing tag
    ("Q", "<think>a<think>b</think>c", 0.0),  # a nested opening tag
    ("Q", "<think>a</think>b<think>c</think>d", 0.0),  # two blocks
    ("Q", "just 42", 0.0),
])
def test_format_reward(prompt, completion, reward):
    assert format_reward(prompt, completion, answer="42") == reward


# ---- load_reward ----------------------------------------------------------------------------------------------


def test_load_builtins():
    assert load_reward("exact_answer") is exact_answer
    assert load_reward("format") is format_reward
    assert load_reward("zili.train.rewards:format_reward") is format_reward


def test_load_a_function_from_a_user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_for_test.py").write_text(
        "def length_bonus(prompt, completion, **fields):\n"
        "    return len(completion) / 10\n"
        "class Scorer:\n"
        "    @staticmethod\n"
        "    def short(prompt, completion, **fields):\n"
        "        return float(len(completion) < 5)\n"
        "NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward("my_rewards_for_test:length_bonus")
    assert fn("p", "abcde") == 0.5
    assert load_reward(" my_rewards_for_test : Scorer.short ")("p", "abc") == 1.0
    with pytest.raises(UserError, match="is a int, not a function"):
        load_reward("my_rewards_for_test:NOT_CALLABLE")
    with pytest.raises(UserError, match="has no attribute 'missing'"):
        load_reward("my_rewards_for_test:missing")


@pytest.mark.parametrize("spec, fragment", [
    ("exactanswer", "neither a built-in nor 'module:function'"),
    ("some_module:", "neither a built-in"),
    (":fn", "neither a built-in"),
    ("zili_no_such_module_xyz:fn", "cannot import module 'zili_no_such_module_xyz' (ModuleNotFoundError"),
    ("zili.train.rewards:no_such_fn", "has no attribute 'no_such_fn'"),
    ("zili.train.rewards:BUILTINS", "is a dict, not a function"),
])
def test_bad_specs_are_one_line_user_errors(spec, fragment):
    with pytest.raises(UserError) as info:
        load_reward(spec)
    message = str(info.value)
    assert fragment in message and spec.strip() in message and "\n" not in message


def test_a_module_that_fails_while_importing(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards_for_test.py").write_text("def f(:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="cannot import module 'broken_rewards_for_test' \\(SyntaxError") as info:
        load_reward("broken_rewards_for_test:f")
    assert "\n" not in str(info.value)


# ---- score ----------------------------------------------------------------------------------------------------

SAMPLES = [
    {"prompt": "1+1?", "completion": "<think>sum</think> 2", "answer": "2"},
    {"prompt": "2+2?", "completion": "Answer: 5", "answer": 4},
    {"prompt": "3+3?", "completion": "it is 6", "answer": "6", "difficulty": 1},
]


def test_score_calls_the_reward_with_the_fields():
    seen = []

    def reward(prompt, completion, **fields):
        seen.append((prompt, completion, fields))
        return len(fields)

    got = score(reward, "t:reward", SAMPLES)
    assert got.dtype == torch.float32 and got.tolist() == [1.0, 1.0, 2.0]
    assert seen[2] == ("3+3?", "it is 6", {"answer": "6", "difficulty": 1})
    assert score(exact_answer, "exact_answer", SAMPLES).tolist() == [1.0, 0.0, 1.0]
    assert score(format_reward, "format", SAMPLES).tolist() == [1.0, 0.0, 0.0]
    assert score(exact_answer, "exact_answer", []).shape == (0,)


@pytest.mark.parametrize("value, expected", [(True, 1.0), (False, 0.0), (3, 3.0), (np.float64(0.25), 0.25),
                                             (np.int64(2), 2.0)])
def test_score_accepts_real_numbers_and_bools(value, expected):
    assert score(lambda p, c, **f: value, "r", SAMPLES[:1]).tolist() == [expected]


def fails_on_the_second(prompt, completion, **fields):
    if prompt == "2+2?":
        raise ValueError("missing 'steps'\n  second line")
    return 1.0


@pytest.mark.parametrize("fn, fragment", [
    (fails_on_the_second, "reward 'mod:fn', sample 1 (prompt '2+2?'): raised ValueError: missing 'steps' second "
                          "line — "),
    (lambda p, c, **f: None if p == "2+2?" else 1.0, "sample 1 (prompt '2+2?'): returned NoneType None, not a"),
    (lambda p, c, **f: "1.0", "sample 0 (prompt '1+1?'): returned str '1.0', not a number"),
    (lambda p, c, **f: torch.tensor(1.0), "sample 0 (prompt '1+1?'): returned Tensor"),
    (lambda p, c, **f: math.nan if p == "3+3?" else 0.0, "sample 2 (prompt '3+3?'): returned nan"),
    (lambda p, c, **f: -math.inf, "sample 0 (prompt '1+1?'): returned -inf"),
])
def test_bad_rewards_are_one_line_user_errors(fn, fragment):
    with pytest.raises(UserError) as info:
        score(fn, "mod:fn", SAMPLES)
    message = str(info.value)
    assert fragment in message and "\n" not in message
    # nothing chained: the CLI's one line is the whole story
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)


def test_samples_without_prompt_or_completion():
    with pytest.raises(UserError, match="'format', sample 1 \\(prompt 'x'\\): not a mapping with 'prompt' and"):
        score(format_reward, "format", [SAMPLES[0], {"prompt": "x"}])
