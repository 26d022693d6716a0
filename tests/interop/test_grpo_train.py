"""GRPO through `zili train --training.objective=grpo`: rollouts from a Hugging Face starting model, a reward
named as module:function, the per-step metrics, exact resume (bit for bit, rollouts included), and the one-line
errors of a bad reward."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.interop.conftest import transformers  # noqa: F401  (skips without transformers)
from zili.config import load_config
from zili.infer.run import load_run
from zili.train.rl import PromptOrder, RLTrainer, rollout_seed

REWARD = '''
def reward(prompt, completion, answer=None, **fields):
    """Varies with the completion, so the groups have advantages to follow."""
    return float(sum(map(ord, completion)) % 5)


def broken(prompt, completion, **fields):
    return float("nan")
'''

METRICS = {"reward_mean", "reward_std", "accuracy", "completion_len", "clip_fraction", "entropy", "kl"}


def grpo_args(hf_dir, prompts, run_dir, steps, *extra):
    return ["train", "--training.objective=grpo", f"--model.init=hf:{hf_dir}", f"--rl.prompts={prompts}",
            f"--rl.eval_prompts={prompts}", "--rl.eval_limit=2", "--rl.reward=rewards_mod:reward",
            "--rl.group_size=4", "--rl.max_new_tokens=5", "--rl.kl_beta=0.05", "--rl.updates_per_batch=2",
            "--training.batch_size=2", f"--training.steps={steps}", "--training.seq_len=64", "--training.dtype=fp32",
            "--metrics.log_every=1", "--training.eval_every=2", "--checkpoint.every=2", "--metrics.progress=false",
            "--training.sample_tokens=0", "--optimizer.lr=1e-3", "--optimizer.warmup_steps=0",
            f"--training.run_dir={run_dir}", *extra]


@pytest.fixture
def prompts(tmp_path):
    (tmp_path / "rewards_mod.py").write_text(REWARD)
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a} plus 1", "answer": str(a + 1)}) + "\n" for a in range(10)))
    return path


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_trains_logs_its_metrics_and_resumes_exactly(hf_models, prompts, tmp_path, zili_cli):
    hf = hf_models["qwen2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    proc = zili_cli(*grpo_args(hf, prompts, whole, 4))
    assert proc.returncode == 0, proc.stderr[-2000:]
    logged = records(whole)
    assert [r["step"] for r in logged] == [0, 1, 2, 3, 4] and logged[0]["val_accuracy"] == 0.0
    for r in logged[1:]:
        assert METRICS <= set(r) and r["completion_len"] > 0 and r["reward_std"] > 0
        assert 0 <= r["clip_fraction"] <= 1 and r["kl"] >= 0 and r["entropy"] > 0
    assert logged[1]["clip_fraction"] == 0.0  # first update of a batch: ratio 1, so nothing clipped yet...
    assert logged[2]["kl"] > 0  # ...and after the first steps the policy has moved off the starting model
    first = zili_cli(*grpo_args(hf, prompts, parts, 4, "--training.exit_after=2"))
    assert first.returncode == 0 and "stopping after step 2" in first.stdout
    second = zili_cli(*grpo_args(hf, prompts, parts, 4, "--checkpoint.resume=auto"))
    assert second.returncode == 0, second.stderr[-2000:]
    drop = ("tokens_per_s", "mfu", "peak_mem_gb")
    assert [{k: v for k, v in r.items() if k not in drop} for r in records(parts)] == \
           [{k: v for k, v in r.items() if k not in drop} for r in logged]
    wa, wb = (load_run(d, device="cpu")[0].state_dict() for d in (whole, parts))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    start = load_file(hf / "model.safetensors")
    assert not torch.equal(wa["embed.weight"], start["model.embed_tokens.weight"])


@pytest.mark.parametrize("reward, fragment", [
    ("rewards_mod:broken", "rewards_mod:broken"),
    ("rewards_mod:nothing", "rewards_mod:nothing"),
    ("no_colon_here", "no_colon_here"),
])
def test_a_bad_reward_is_one_line(hf_models, prompts, tmp_path, zili_cli, reward, fragment):
    proc = zili_cli(*grpo_args(hf_models["qwen2"], prompts, tmp_path / "run", 1), f"--rl.reward={reward}")
    assert proc.returncode == 2 and fragment in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_grpo_needs_a_starting_model_and_prompts(hf_models, prompts, tmp_path):
    with pytest.raises(Exception, match="model.init"):
        RLTrainer(load_config(None, [("training.objective", "grpo"), ("rl.prompts", str(prompts)),
                                     ("training.run_dir", str(tmp_path / "r"))]))
    with pytest.raises(Exception, match="rl.prompts"):
        RLTrainer(load_config(None, [("training.objective", "grpo"), ("model.init", f"hf:{hf_models['qwen2']}")]))


def test_prompt_order_and_rollout_seeds_do_not_depend_on_the_world_size():
    one = PromptOrder(10, 4, seed=3, rank=0, world_size=1, n_val=0)
    two = [PromptOrder(10, 4, seed=3, rank=r, world_size=2, n_val=0) for r in range(2)]
    for _ in range(4):  # across an epoch boundary
        assert one.next_indices() == two[0].next_indices() + two[1].next_indices()
    assert rollout_seed(1, 2, 3) == rollout_seed(1, 2, 3) != rollout_seed(1, 3, 3)


def test_prompts_from_parquet_keep_every_field_for_the_rewards(hf_models, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from zili.data.chat import encode_prompt, load_chat_template
    from zili.data.tokenizer import Tokenizer
    from zili.train.rl import read_prompts

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["2 plus 2", "3 plus 1"], "answer": ["4", "4"], "level": [1, 2]}), path)
    tokenizer, template = Tokenizer.load(hf_models["qwen2"]), load_chat_template(hf_models["qwen2"])
    prompts = read_prompts(str(path), tokenizer, template, use_template=True, system="be brief")
    assert [p.fields for p in prompts] == [{"answer": "4", "level": 1}, {"answer": "4", "level": 2}]
    assert prompts[0].text == "2 plus 2"
    assert prompts[0].ids == encode_prompt(tokenizer, template, [{"role": "system", "content": "be brief"},
                                                                 {"role": "user", "content": "2 plus 2"}])
    plain = read_prompts(str(path), tokenizer, template, use_template=False, system="")
    assert plain[1].ids == tokenizer.encode("3 plus 1")


def test_batched_greedy_validation_gives_the_answers_of_one_prompt_at_a_time(hf_models, tmp_path):
    path = tmp_path / "p.jsonl"
    texts = [f"{a} plus 1" for a in range(7)] + ["a longer prompt than the others", "x", "another longer prompt here"]
    path.write_text("".join(json.dumps({"prompt": t, "answer": "1"}) + "\n" for t in texts))
    trainer = RLTrainer(load_config(None, [
        ("training.objective", "grpo"), ("model.init", f"hf:{hf_models['qwen2']}"), ("rl.prompts", str(path)),
        ("rl.max_new_tokens", "6"), ("training.seq_len", "64"), ("training.dtype", "fp32"),
        ("training.run_dir", str(tmp_path / "run"))]))
    assert len({len(p.ids) for p in trainer.prompts}) > 1  # several lengths, so several batches
    one_by_one = trainer._sample(trainer.prompts, list(range(len(texts))), 1, greedy=True)
    assert trainer._greedy(trainer.prompts, batch=3) == one_by_one
    assert trainer.model.parts[0].training  # left in training mode, as _sample leaves it
