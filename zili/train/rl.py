"""GRPO training (`training.objective = "grpo"`, the `[rl]` config): the trainer's loop with rollouts instead of a
token dataset. Each step:

1. this rank's prompts: `training.batch_size` prompts a step over all data-parallel ranks, in the order of a
   seeded permutation per epoch (`PromptOrder`: position and resume as the token loader's);
2. rollouts: `group_size` completions of each prompt sampled from the policy (zili.infer.generate.sample_group, the
   KV cache; on a sharded policy every rank runs the same number of forwards), each cut after the end of turn
   (the end-of-sequence id, or the chat template's end-of-turn marker) — with a generator seeded by (seed, step,
   prompt index), so the same prompts get the same completions under any world size and after a resume;
3. rewards: the `[rl] reward` functions (zili.train.rewards) summed with their weights, group-normalised
   advantages (zili.train.grpo);
4. `updates_per_batch` optimizer steps on the batch: the PPO-clipped loss against the log-probabilities the
   policy gave before the first update, optionally a k3 KL to the frozen starting model — every log-probability
   (policy, old, reference) taken under softmax(logits / rl.temperature), the distribution the rollouts were
   drawn from, so the policy optimised is the one that sampled (TRL and verl do the same); the loss is the mean
   over the completion tokens of the global batch (token aggregation; or per sequence, then over sequences),
   whatever their split over ranks and micro-batches. A step that is not finite changes nothing.

Metrics per step (means over the global batch): reward_mean, reward_std, accuracy (share of completions the
`[rl] accuracy` reward scores >= 0.5), completion_len (tokens), kl (k3, to the starting model, when kl_beta > 0),
clip_fraction, entropy (nats per completion token, at the sampling temperature). Validation: `val_accuracy`,
greedy answers to up to `eval_limit` held-out prompts.

Prompt records (JSONL or Parquet through zili.data.readers): a `prompt` string — rendered as a user turn with the
tokenizer's chat template (and `[rl] system`) unless `chat_template = false` — or `messages`; any other field is
passed to the rewards (e.g. `answer`). The prompt a reward sees is the `prompt` string, or the last user turn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from zili import checkpoint
from zili.checkpoint import CheckpointWeights
from zili.config import Config
from zili.data.chat import encode_prompt, load_chat_template, validate_messages
from zili.data.documents import find_files
from zili.data.loader import epoch_permutation
from zili.data.readers import read_records
from zili.errors import UserError
from zili.infer.chat import end_of_turn
from zili.infer.generate import sample_group, sample_rows
from zili.interop.import_hf import HFWeights
from zili.models.transformer import Transformer
from zili.parallel.apply import parallelize
from zili.parallel.mesh import dp_rank
from zili.train.grpo import gather_logprobs, group_advantages, grpo_loss, token_entropy
from zili.train.rewards import load_reward, score
from zili.train.step import (
    StepResult,
    balance_experts,
    clip_grad_norm_,
    lm_loss,
    nonfinite,
    optimizer_step,
)
from zili.train.trainer import Trainer


@dataclass(frozen=True)
class Prompt:
    """A prompt as the policy sees it (`ids`), as the rewards see it (`text`), and its other fields."""

    ids: list[int]
    text: str
    fields: dict


def read_prompts(spec: str, tokenizer, template, use_template: bool, system: str) -> list[Prompt]:
    """The prompts of the comma-separated files/directories `spec` (see the module doc); UserError for a record
    without a `prompt` string or valid `messages`."""
    files = find_files([p.strip() for p in spec.split(",") if p.strip()])
    prompts = []
    for path in files:
        for where, record in read_records(Path(path)):  # Parquet: every column, the rewards may read any
            if not isinstance(record, dict) or not (isinstance(record.get("prompt"), str) or "messages" in record):
                raise UserError(f"{where}: a prompt record needs a 'prompt' string or 'messages' — fix the record")
            fields = {k: v for k, v in record.items() if k not in ("prompt", "messages")}
            if "messages" in record:
                try:
                    messages = validate_messages(record["messages"], need_assistant=False)
                except UserError as e:
                    raise UserError(f"{where}: {e}") from None
                text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
                ids = encode_prompt(tokenizer, template, messages)
            elif use_template:
                text = record["prompt"]
                messages = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": text}]
                ids = encode_prompt(tokenizer, template, messages)
            else:
                text = record["prompt"]
                ids = tokenizer.encode(text)
            if not ids:
                raise UserError(f"{where}: the prompt is empty — give it some text")
            prompts.append(Prompt(ids, text, fields))
    if not prompts:
        raise UserError(f"no prompts in {spec} — give JSONL lines with a 'prompt' field")
    return prompts


class PromptOrder:
    """The prompts of each step for one rank: `batch_size` a step over `world_size` ranks, in the order of a
    permutation per epoch (zili.data.loader.epoch_permutation); `position` (prompts consumed globally) is the whole
    state, so a resume under any world size continues the same order. Quacks like the token Loader where the
    trainer needs it (state_dict, load_state_dict, n_val)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world_size: int, n_val: int):
        if batch_size % world_size:
            raise UserError(f"training.batch_size {batch_size} (prompts per step) is not a multiple of the "
                            f"{world_size} data-parallel ranks — use a multiple of {world_size}")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.n_val, self.position = n_val, 0

    def next_indices(self) -> list[int]:
        """This rank's prompt indices for the next step."""
        ids, position = [], self.position
        while len(ids) < self.batch_size:
            epoch, offset = divmod(position, self.n)
            order = epoch_permutation(self.n, self.seed, epoch)
            take = order[offset: offset + self.batch_size - len(ids)]
            ids.extend(int(i) for i in take)
            position += len(take)
        self.position += self.batch_size
        per_rank = self.batch_size // self.world_size
        return ids[self.rank * per_rank: (self.rank + 1) * per_rank]

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.position // self.n}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def rollout_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of prompt `index`'s group at `step` (depends on nothing else)."""
    return int(np.random.SeedSequence([seed % 2**63, step, index]).generate_state(1, dtype=np.uint64)[0] % 2**63)


class RLTrainer(Trainer):
    """The trainer with GRPO steps (module doc)."""

    def __init__(self, cfg: Config):
        rl = cfg.rl
        if not rl.prompts:
            raise UserError("training.objective=grpo needs prompts — set rl.prompts to a JSONL file of "
                            "{\"prompt\": ..., \"answer\": ...} records")
        for key in ("group_size", "max_new_tokens", "updates_per_batch"):
            if getattr(rl, key) < 1:
                raise UserError(f"rl.{key} must be at least 1, got {getattr(rl, key)}")
        if rl.temperature < 0 or not 0 < rl.top_p <= 1 or rl.clip_eps < 0 or rl.kl_beta < 0:
            raise UserError("need rl.temperature >= 0, 0 < rl.top_p <= 1, rl.clip_eps >= 0 and rl.kl_beta >= 0")
        specs = [s.strip() for s in rl.reward.split(",") if s.strip()]
        weights = [float(w) for w in rl.reward_weights.split(",")] if rl.reward_weights.strip() else [1.0] * len(specs)
        if not specs or len(weights) != len(specs):
            raise UserError(f"rl.reward_weights has {len(weights)} weights for {len(specs)} rewards — give one each")
        self.rewards = [(spec, load_reward(spec), w) for spec, w in zip(specs, weights)]
        self.accuracy_reward = (rl.accuracy, load_reward(rl.accuracy)) if rl.accuracy else None
        super().__init__(cfg)
        self.template = load_chat_template(self.tokenizer_dir)
        marker = end_of_turn(self.template)
        marker_ids = self.tokenizer.backend.encode(marker, add_special_tokens=False).ids if marker else []
        self.marker = marker
        self.stop_ids = [self.tokenizer.eos_id] + (marker_ids if len(marker_ids) == 1 else [])
        self.prompts = read_prompts(rl.prompts, self.tokenizer, self.template, rl.chat_template, rl.system)
        self.eval_set = (read_prompts(rl.eval_prompts, self.tokenizer, self.template, rl.chat_template,
                                      rl.system)[: rl.eval_limit] if rl.eval_prompts else [])
        longest = max(len(p.ids) for p in self.prompts + self.eval_set) + rl.max_new_tokens
        if longest > self.args.max_seq_len:
            raise UserError(f"the longest prompt plus rl.max_new_tokens is {longest} tokens, over the model's "
                            f"max_seq_len {self.args.max_seq_len} — lower rl.max_new_tokens or shorten the prompts")
        self.loader = PromptOrder(len(self.prompts), cfg.training.batch_size, cfg.training.seed,
                                  dp_rank(self.mesh) if self.mesh else 0, self.layout.dp, len(self.eval_set))
        self.reference = None
        if rl.kl_beta > 0:  # the frozen starting model (rebuilt from model.init: the same after a resume)
            kind, source = cfg.model.init.split(":", 1)
            with torch.device("meta"):
                model = Transformer(self.args)
            start = (CheckpointWeights(checkpoint.resolve(Path(source))) if kind == "run"
                     else HFWeights(Path(source), model))
            self.reference = parallelize(model, cfg, self.layout, self.mesh, self.accel.device, seed=cfg.training.seed,
                                         compute_dtype=self.dtype, initial_value=start, loss_fn=lm_loss)
            self.reference.parts[0].requires_grad_(False)

    def _make_loader(self):
        return None  # set in __init__ once the prompts are read

    # ---- rollouts ---------------------------------------------------------------------------------
    def _cut(self, completion: list[int]) -> tuple[list[int], str]:
        """The completion up to its end of turn (a stop id, or the end-of-turn marker spelled in several tokens),
        and its text without the marker or the stop id."""
        if completion and completion[-1] in self.stop_ids:
            return completion, self.tokenizer.decode(completion[:-1])
        text = self.tokenizer.decode(completion)
        if self.marker and self.marker in text:
            for end in range(1, len(completion) + 1):  # the shortest prefix that holds the marker
                if self.marker in self.tokenizer.decode(completion[:end]):
                    return completion[:end], text[: text.index(self.marker)]
        return completion, text

    def _sample(self, prompts: list[Prompt], indices: list[int], n: int, greedy: bool) -> list[list[tuple]]:
        """For each prompt, `n` (tokens, text) completions."""
        rl, model = self.cfg.rl, self.model.parts[0]
        model.train(False)
        out = []
        with self.autocast():
            for prompt, index in zip(prompts, indices):
                generator = torch.Generator().manual_seed(rollout_seed(self.cfg.training.seed, self.step, index))
                rows = sample_group(model, prompt.ids, n, rl.max_new_tokens, 0.0 if greedy else rl.temperature,
                                    rl.top_p, generator, self.stop_ids, early_stop=self.world_size == 1)
                out.append([self._cut(row) for row in rows])
        model.train(True)
        return out

    @torch.no_grad()
    def _greedy(self, prompts: list[Prompt], batch: int = 64) -> list[list[tuple]]:
        """For each prompt, its one greedy (tokens, text) completion, as `_sample(..., 1, greedy=True)` gives —
        but up to `batch` prompts of one length decoded together (zili.infer.generate.sample_rows) instead of one
        prompt at a time. One process only: the ranks of a sharded model must run as many forwards as each other,
        which their own batches would not."""
        model = self.model.parts[0]
        by_length: dict[int, list[int]] = {}
        for i, prompt in enumerate(prompts):
            by_length.setdefault(len(prompt.ids), []).append(i)
        out: list = [None] * len(prompts)
        model.train(False)
        with self.autocast():
            for members in by_length.values():
                for k in range(0, len(members), batch):
                    rows = members[k: k + batch]
                    answers = sample_rows(model, [prompts[i].ids for i in rows], self.cfg.rl.max_new_tokens, 0.0,
                                          1.0, torch.Generator(), self.stop_ids)  # greedy: the generator is unused
                    for i, answer in zip(rows, answers):
                        out[i] = [self._cut(answer)]
        model.train(True)
        return out

    def _rewards(self, prompts: list[Prompt], completions: list[list[tuple]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed weighted rewards, accuracy 0/1) per completion, prompt-major."""
        samples = [{"prompt": p.text, "completion": text, **p.fields} for p, group in zip(prompts, completions)
                   for _, text in group]
        total = sum(w * score(fn, spec, samples) for spec, fn, w in self.rewards)
        correct = (score(self.accuracy_reward[1], self.accuracy_reward[0], samples) >= 0.5).float() \
            if self.accuracy_reward else torch.zeros(len(samples))
        return total, correct

    # ---- the step ---------------------------------------------------------------------------------
    def _global_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.model.data_group is not None:
            values = values.to(self.accel.device)
            dist.all_reduce(values, group=self.model.data_group)
        return values.cpu()

    @property
    def temperature(self) -> float:
        """The temperature of the policy being optimised: the rollouts' (1 for greedy rollouts, T = 0)."""
        return self.cfg.rl.temperature or 1.0

    def _logprobs(self, model, inputs, targets) -> torch.Tensor:
        # scored at the sampling temperature: the ratio and the gradient are those of the policy that sampled
        with self.autocast():
            return gather_logprobs(model(inputs), targets, self.temperature)

    def step_once(self) -> StepResult:
        rl, t = self.cfg.rl, self.cfg.training
        indices = self.loader.next_indices()
        prompts = [self.prompts[i] for i in indices]
        completions = self._sample(prompts, indices, rl.group_size, greedy=False)
        rewards, correct = self._rewards(prompts, completions)
        advantages = group_advantages(rewards, rl.group_size, rl.scale_by_std)
        rows = [p.ids + tokens for p, group in zip(prompts, completions) for tokens, _ in group]
        starts = [len(p.ids) for p in prompts for _ in range(rl.group_size)]
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), self.tokenizer.eos_id, dtype=torch.int64)
        mask = torch.zeros(len(rows), width - 1, dtype=torch.bool)
        for i, (row, start) in enumerate(zip(rows, starts)):
            tokens[i, : len(row)] = torch.tensor(row)
            mask[i, start - 1: len(row) - 1] = True  # logits at position p predict token p + 1
        device = self.accel.device
        inputs, targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
        mask, advantages = mask.to(device), advantages.to(device)
        micro = t.micro_batch_size or len(rows)
        chunks = [slice(i, i + micro) for i in range(0, len(rows), micro)]
        model = self.model.parts[0]
        # the denominator of the global mean (tokens or sequences over all data ranks), per data rank
        count = mask.sum() if rl.aggregation == "token" else mask.any(dim=1).sum()
        denominator = self._global_sum(count.float().reshape(1))[0] / self.layout.dp
        with torch.no_grad():
            old = torch.cat([self._logprobs(model, inputs[c], targets[c]) for c in chunks])
            ref = (torch.cat([self._logprobs(self.reference.parts[0], inputs[c], targets[c]) for c in chunks])
                   if self.reference is not None else None)
        clip = (rl.clip_eps, max(rl.clip_eps_high, rl.clip_eps))
        sync = getattr(model, "set_requires_gradient_sync", None)
        sums = torch.zeros(4)  # clip fraction x tokens, kl x tokens, entropy x tokens, tokens (first update)
        for update in range(rl.updates_per_batch):
            loss_total = torch.zeros((), device=device)
            for k, c in enumerate(chunks):
                if sync is not None:
                    sync(k == len(chunks) - 1)
                with self.autocast():
                    logits = model(inputs[c])
                    logprobs = gather_logprobs(logits, targets[c], self.temperature)
                loss, metrics = grpo_loss(logprobs, old[c], advantages[c], mask[c], clip, rl.kl_beta,
                                          None if ref is None else ref[c], rl.aggregation, denominator)
                loss.backward()
                loss_total += loss.detach()
                if update == 0:
                    n = float(mask[c].sum())
                    with torch.no_grad():
                        entropy = float(token_entropy(logits, mask[c], self.temperature))
                    sums += torch.tensor([metrics["clip_fraction"] * n, metrics.get("kl", 0.0) * n, entropy * n, n])
            grad_norm = clip_grad_norm_(self.model.parameters(), t.grad_clip, self.model.pp_group)
            skipped = nonfinite(loss_total, grad_norm)
            for optimizer in self.optimizers:
                optimizer_step(optimizer, skipped)
            load = balance_experts(self.model, self.cfg.moe.bias_update_rate, skipped)
        lengths = torch.tensor([float(len(tok)) for group in completions for tok, _ in group])
        totals = self._global_sum(torch.cat([
            torch.stack([rewards.sum(), rewards.square().sum(), correct.sum(), lengths.sum(),
                         torch.tensor(float(len(rows))), torch.tensor(float(sum(len(r) for r in rows)))]),
            sums]))
        n_rows, n_tokens = float(totals[4]), float(totals[9]) or 1.0
        mean = float(totals[0]) / n_rows
        metrics = {"reward_mean": mean, "reward_std": math.sqrt(max(float(totals[1]) / n_rows - mean * mean, 0.0)),
                   "accuracy": float(totals[2]) / n_rows, "completion_len": float(totals[3]) / n_rows,
                   "clip_fraction": float(totals[6]) / n_tokens, "entropy": float(totals[8]) / n_tokens}
        if rl.kl_beta > 0:
            metrics["kl"] = float(totals[7]) / n_tokens
        result = StepResult(loss_total, grad_norm, skipped, load, tokens=int(totals[5]), metrics=metrics)
        self.count_skips(result)
        return result

    # ---- validation -------------------------------------------------------------------------------
    @torch.no_grad()
    def validation(self) -> dict[str, float | None]:
        """{"val_accuracy": share of the held-out prompts answered right, greedy}."""
        return {"val_accuracy": accuracy(self, self.eval_set)}


def accuracy(trainer: RLTrainer, prompts: list[Prompt]) -> float | None:
    """The share of `prompts` whose greedy answer the accuracy reward scores >= 0.5 (each data rank answers its
    share; ranks run as many prompts, the last ones padded with repeats that do not count). One process decodes
    the prompts of one length together (`RLTrainer._greedy`): the same answers, many times faster."""
    if not prompts or trainer.accuracy_reward is None:
        return None
    ranks, rank = trainer.layout.dp, dp_rank(trainer.mesh) if trainer.mesh else 0
    per_rank = -(-len(prompts) // ranks)
    mine = [(i, prompts[i % len(prompts)]) for i in range(rank * per_rank, (rank + 1) * per_rank)]
    if trainer.world_size == 1:  # prompts of one length in batches
        answers = trainer._greedy([p for _, p in mine])
    else:  # one at a time, so that every rank runs as many forwards (greedy: seeds unused)
        answers = trainer._sample([p for _, p in mine], [i for i, _ in mine], 1, greedy=True)
    _, correct = trainer._rewards([p for _, p in mine], answers)
    real = torch.tensor([float(i < len(prompts)) for i, _ in mine])
    totals = trainer._global_sum(torch.stack([(correct * real).sum(), real.sum()]))
    return float(totals[0]) / float(totals[1])
