"""The reasoning demo's task (zili.data.arithmetic): worked answers that add column by column to the true sum, the
sloppy teacher's dropped carries, and a task directory that is a function of its arguments."""

from __future__ import annotations

import json
import random

import pytest

from zili.data.arithmetic import HELDOUT_FILE, RL_FILE, SFT_FILE, problems, worked_answer, write_task


def stated(answer: str) -> int:
    return int(answer.rsplit("Answer: ", 1)[1])


def test_worked_answers_add_column_by_column_to_the_true_sum():
    assert worked_answer(478, 352) == ("<think>8+2=10, write 0 carry 1. 7+5+1=13, write 3 carry 1. 4+3+1=8, "
                                       "write 8.</think> Answer: 830")
    assert worked_answer(95, 5).endswith("write the carry 1.</think> Answer: 100")
    for a, b in problems(0, 300, 2) + problems(1, 100, 3):
        assert stated(worked_answer(a, b)) == a + b


def test_the_sloppy_teacher_drops_carries_at_its_rate_and_states_what_its_columns_give():
    assert worked_answer(47, 38, random.Random(0), 1.0) == ("<think>7+8=15, write 5 carry 1. 4+3=7, write 7."
                                                            "</think> Answer: 75")
    assert stated(worked_answer(99, 99, random.Random(0), 1.0)) == 188  # 18, then 9+9=18: the last carry stays
    assert worked_answer(12, 34, random.Random(0), 1.0) == worked_answer(12, 34)  # nothing owed, nothing dropped
    rng = random.Random(1)
    owed = [(a, b) for a, b in problems(2, 4000, 2) if a % 10 + b % 10 >= 10]  # a carry into the tens column
    wrong = sum(stated(worked_answer(a, b, rng, 0.6)) != a + b for a, b in owed) / len(owed)
    assert wrong == pytest.approx(0.6, abs=0.03)
    assert all(stated(worked_answer(a, b, rng, 0.0)) == a + b for a, b in owed)


def test_write_task_keeps_true_answers_for_the_prompts_and_is_a_function_of_its_arguments(tmp_path):
    kwargs = dict(seed=3, digits=2, n_sft=300, n_rl=40, n_heldout=30, slip=0.6)
    one, two = write_task(tmp_path / "a", **kwargs), write_task(tmp_path / "b", **kwargs)
    for name in (SFT_FILE, RL_FILE, HELDOUT_FILE):
        assert (one / name).read_text() == (two / name).read_text()
    conversations = [json.loads(line)["messages"] for line in (one / SFT_FILE).read_text().splitlines()]
    sums = [sum(int(x) for x in c[0]["content"][len("What is "):-1].split(" + ")) for c in conversations]
    assert any(stated(c[1]["content"]) != s for c, s in zip(conversations, sums))  # some demonstrations wrong
    for name in (RL_FILE, HELDOUT_FILE):
        for line in (one / name).read_text().splitlines():
            record = json.loads(line)
            a, b = (int(x) for x in record["prompt"][len("What is "):-1].split(" + "))
            assert record["answer"] == str(a + b)
    flawless = write_task(tmp_path / "c", **{**kwargs, "slip": 0.0})
    assert all(stated(json.loads(line)["messages"][1]["content"]) == s
               for line, s in zip((flawless / SFT_FILE).read_text().splitlines(), sums))
    with pytest.raises(ValueError, match="slip"):
        write_task(tmp_path / "d", **{**kwargs, "slip": 1.5})
