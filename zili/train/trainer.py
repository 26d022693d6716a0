"""The training loop: config -> device -> model (meta) -> transforms -> weights -> data -> steps.

Contract of a run directory (RUN_DIR): `config.toml` (the resolved config), `metrics.jsonl`,
`tokenizer/` (the tokenizer the data was prepared with), `checkpoints/step-NNNNNNN/` (complete ones only).
Steps are counted from 1; a checkpoint of step S holds the state after S optimizer steps, and resuming
from it reproduces steps S+1.. exactly as an uninterrupted run would (same seed, same device).
"""

from __future__ import annotations

import datetime
import math
import os
import shutil
import time
from pathlib import Path

import torch

from zili import __version__
from zili.accel import Accelerator, get_accelerator, tune_cpu_allocator
from zili.config import Config
from zili.data.loader import Loader, PackedDataset
from zili.data.tokenizer import Tokenizer
from zili.errors import UserError
from zili.models.flops import flops_per_token
from zili.models.presets import resolve
from zili.models.transformer import Transformer
from zili.parallel.apply import parallelize
from zili.train import checkpoint
from zili.train.metrics import MetricsLog
from zili.train.optim import build_optimizer, lr_at, set_lr
from zili.train.step import lm_loss, train_step


def dataset_dir(cfg: Config) -> Path:
    if cfg.data.dataset == "demo":
        from zili.data.demo import demo_dataset

        return demo_dataset()
    return Path(cfg.data.dataset)


def make_run_dir(cfg: Config) -> Path:
    if cfg.training.run_dir:
        return Path(cfg.training.run_dir)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / stamp


@torch.no_grad()
def validate(model, loader: Loader, accel: Accelerator, dtype: torch.dtype, n_batches: int) -> float | None:
    """Mean loss over the fixed validation batches (nats/token); None without a validation split."""
    model.eval()
    total = torch.zeros((), device=accel.device)
    count = 0
    for inputs, targets in loader.val_batches(n_batches):
        with accel.autocast(dtype):
            logits = model(inputs.to(accel.device))
        total += lm_loss(logits, targets.to(accel.device))
        count += 1
    model.train()
    return float(total) / count if count else None


class Trainer:
    """Builds everything a run needs from a Config; `run()` trains and returns the run directory."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        t = cfg.training
        self.accel = get_accelerator(t.device)
        self.dtype = self.accel.compute_dtype(t.dtype)
        if self.accel.type == "cpu":
            tune_cpu_allocator()
        self.dataset = PackedDataset(dataset_dir(cfg))
        self.tokenizer = Tokenizer.load(self.dataset.tokenizer_dir)
        self.args = resolve(cfg.model, self.tokenizer.vocab_size)
        if t.seq_len > self.args.max_seq_len:
            raise UserError(f"training.seq_len {t.seq_len} exceeds the model's max_seq_len {self.args.max_seq_len} — lower it")
        self.micro_batch = t.micro_batch_size or t.batch_size
        self.run_dir = make_run_dir(cfg)
        self.loader = Loader(self.dataset, t.seq_len, t.batch_size, t.seed, cfg.data.val_fraction)

        self.accel.seed(t.seed)
        with torch.device("meta"):
            self.model = Transformer(self.args)
        parallelize(self.model, cfg)
        self.model.to_empty(device=self.accel.device)
        self.model.init_weights(seed=t.seed)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.accel.type)
        self.step = 0

    # ---- state -------------------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, torch.Tensor]:
        loader = self.loader.state_dict()
        state = {
            "step": torch.tensor(self.step),
            "loader_position": torch.tensor(loader["position"]),
            "loader_epoch": torch.tensor(loader["epoch"]),
        }
        for name, value in self.accel.rng_state().items():
            state[f"rng_{name}"] = value
        return state

    def save(self) -> None:
        meta = {"zili_version": __version__, "model": self.args.to_dict()}
        checkpoint.save(self.run_dir, self.step, self.model, self.optimizer, self.trainer_state(), meta,
                        self.cfg.checkpoint.keep)

    def maybe_resume(self) -> None:
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return
        if resume == "auto":
            found = checkpoint.list_checkpoints(self.run_dir)
            if not found:
                return
            path = found[-1]
        else:
            path = Path(resume)
            if not (path / ".metadata").is_file():
                raise UserError(f"checkpoint.resume: {resume!r} is not a checkpoint directory — pass a step-NNNNNNN directory or 'auto'")
        checkpoint.check_compatible(path, self.args.to_dict())
        state = checkpoint.load(path, self.model, self.optimizer, self.trainer_state())
        self.step = int(state["step"])
        self.loader.load_state_dict({"position": int(state["loader_position"]), "epoch": int(state["loader_epoch"])})
        self.accel.set_rng_state({k[4:]: v for k, v in state.items() if k.startswith("rng_")})
        print(f"resumed from {path} at step {self.step}")

    # ---- loop --------------------------------------------------------------------------------------
    def prepare_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.toml").write_text(self.cfg.to_toml())
        tok_dir = self.run_dir / "tokenizer"
        if not tok_dir.exists():
            tmp = self.run_dir / f".tmp-tokenizer-{os.getpid()}"
            shutil.copytree(self.dataset.tokenizer_dir, tmp, dirs_exist_ok=True)
            tmp.rename(tok_dir)

    def run(self) -> Path:
        cfg, t = self.cfg, self.cfg.training
        self.prepare_run_dir()
        self.maybe_resume()
        log = MetricsLog(self.run_dir, t.steps, self.step, enabled=True, progress=cfg.metrics.progress)
        flops = flops_per_token(self.args, t.seq_len)
        peak = self.accel.peak_flops(self.dtype)
        tokens_per_step = t.batch_size * t.seq_len
        autocast = lambda: self.accel.autocast(self.dtype)  # noqa: E731

        if self.step == 0 and t.eval_every and self.loader.n_val:
            val = validate(self.model, self.loader, self.accel, self.dtype, t.eval_batches)
            log.write({"step": 0, "loss": None, "lr": None, "grad_norm": None, "tokens_per_s": None,
                       "mfu": None, "peak_mem_gb": None, "val_loss": val})
        started_at = self.step
        timed_steps, timer, overhead = 0, time.perf_counter(), 0.0  # tokens/s excludes eval and checkpoints
        while self.step < t.steps:
            lr = lr_at(self.step, t.steps, cfg.optimizer)
            set_lr(self.optimizer, lr)
            inputs, targets = self.loader.next_batch()
            inputs, targets = inputs.to(self.accel.device), targets.to(self.accel.device)
            loss, grad_norm = train_step(self.model, self.optimizer, inputs, targets, micro_batch=self.micro_batch,
                                         autocast=autocast, grad_clip=t.grad_clip)
            self.step += 1
            timed_steps += 1
            log.advance()
            last = self.step == t.steps
            stopping = bool(t.exit_after) and self.step - started_at >= t.exit_after and not last
            if self.step % cfg.metrics.log_every == 0 or last or stopping:
                loss_value = float(loss)  # the one host sync per logged step
                tokens_per_s = timed_steps * tokens_per_step / (time.perf_counter() - timer - overhead)
                record = {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                          "tokens_per_s": tokens_per_s, "mfu": flops * tokens_per_s / peak,
                          "peak_mem_gb": self.accel.peak_memory_gb()}
                timed_steps, timer, overhead = 0, time.perf_counter(), 0.0
                if t.eval_every and (self.step % t.eval_every == 0 or last) and self.loader.n_val:
                    record["val_loss"] = validate(self.model, self.loader, self.accel, self.dtype, t.eval_batches)
                log.write(record)
                if not math.isfinite(loss_value):
                    log.close()
                    raise UserError(f"the loss became {loss_value} at step {self.step} — "
                                    "lower optimizer.lr or raise optimizer.warmup_steps")
                overhead += time.perf_counter() - timer
            if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or last or stopping:
                begin = time.perf_counter()
                self.save()
                overhead += time.perf_counter() - begin
            if stopping:
                log.close()
                print(f"stopping after step {self.step} (training.exit_after={t.exit_after}); "
                      f"continue with --checkpoint.resume=auto --training.run_dir={self.run_dir}")
                return self.run_dir
        log.close()
        return self.run_dir

    def sample(self) -> str:
        """Generate `sample_tokens` tokens from `sample_prompt` with the trained model (greedy)."""
        from zili.infer.generate import generate

        t = self.cfg.training
        prompt = self.tokenizer.encode(t.sample_prompt) or [self.tokenizer.eos_id]
        self.model.eval()
        with self.accel.autocast(self.dtype):
            new = generate(self.model, prompt, t.sample_tokens, temperature=0.8, top_p=0.95, seed=t.seed,
                           eos_id=self.tokenizer.eos_id)
        self.model.train()
        return self.tokenizer.decode(prompt + new)


def train(cfg: Config) -> Path:
    """Train as configured; print a sample at the end; return the run directory."""
    trainer = Trainer(cfg)
    run_dir = trainer.run()
    print(f"run directory: {run_dir}")
    if cfg.training.sample_tokens and trainer.step == cfg.training.steps:
        print("sample:\n" + trainer.sample())
    return run_dir
