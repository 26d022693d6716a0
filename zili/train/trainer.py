"""The training loop: config -> device + process group + mesh -> model (meta) -> parallelize -> data -> steps.

Contract of a run directory (RUN_DIR): `config.toml` (the resolved config), `metrics.jsonl`,
`tokenizer/` (the tokenizer the data was prepared with), `checkpoints/step-NNNNNNN/` (complete ones only).
Steps are counted from 1; a checkpoint of step S holds the state after S optimizer steps, and resuming
from it reproduces steps S+1.. as an uninterrupted run would — under the same or another parallel layout
(the data order is global, the checkpoint reshards).

Distributed (`torchrun --nproc-per-node N -m zili train ...`): every rank runs this loop on its share of
the model and of the global batch; rank 0 writes the run directory and metrics. Logged loss is the mean
over the global batch, tokens/s counts the tokens of all ranks, MFU divides by the peak of all devices.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from pathlib import Path

import torch

from zili import __version__, checkpoint
from zili.accel import get_accelerator
from zili.checkpoint.background import BackgroundSaver, checkpoint_group
from zili.config import Config
from zili.data.demo import demo_dataset
from zili.data.loader import Loader, PackedDataset
from zili.data.manifest import fingerprint
from zili.data.tokenizer import Tokenizer
from zili.errors import UserError
from zili.fsio import atomic_dir, atomic_write_text
from zili.infer.generate import generate
from zili.interop.hf import args_from_config, read_config
from zili.interop.import_hf import HFWeights
from zili.models.args import ModelArgs
from zili.models.flops import flops_per_token
from zili.models.presets import resolve
from zili.models.transformer import Transformer
from zili.parallel import distributed
from zili.parallel.apply import parallelize
from zili.parallel.mesh import build_mesh, check_layout, dp_rank, resolve_layout
from zili.train import faults
from zili.train.metrics import MetricsLog
from zili.train.optim import build_optimizer, lr_at, set_lr
from zili.train.preemption import StopRequest
from zili.train.step import StepResult, expert_layers, forward_backward, lm_loss, train_step


def dataset_dir(cfg: Config) -> Path:
    """The prepared dataset; the demo corpus is built on first use (by rank 0 while the others wait)."""
    if cfg.data.dataset != "demo":
        return Path(cfg.data.dataset)
    if not distributed.is_main():
        distributed.barrier()
    path = demo_dataset()
    if distributed.is_main():
        distributed.barrier()
    return path


def restart_count() -> int:
    """How many times torchrun restarted this job's workers (`--max-restarts`); 0 in a first attempt."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def make_run_dir(cfg: Config) -> Path:
    if cfg.training.run_dir:
        return Path(cfg.training.run_dir)
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0:
        raise UserError("torchrun --max-restarts needs a fixed training.run_dir, where a restarted job finds its "
                        "checkpoints — set --training.run_dir=DIR")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / stamp


class Trainer:
    """Builds everything a run needs from a Config; `run()` trains and returns the run directory."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        t = cfg.training
        if distributed.env_world_size() > 1 and ":" in t.device:
            raise UserError(f"training.device={t.device!r} names one device for every rank — under torchrun use "
                            f"the device type alone (e.g. {t.device.split(':')[0]}): LOCAL_RANK picks the index")
        self.accel = get_accelerator(t.device)
        if cfg.parallelism.fsdp_cpu_offload and self.accel.type == "cpu":
            raise UserError("parallelism.fsdp_cpu_offload moves FSDP state from an accelerator to host memory, but "
                            "this run is on the CPU already — set it to false")
        self.world_size = distributed.init(self.accel, host_collectives=cfg.parallelism.fsdp_cpu_offload,
                                           timeout_s=cfg.distributed.timeout_s)
        self.layout = resolve_layout(cfg, self.world_size)
        self.accel.tune_for_training()
        if t.objective == "grpo":  # no token dataset: prompts (zili.train.rl) and the starting model's tokenizer
            self.dataset, self.tokenizer, self.tokenizer_dir = None, None, None
        else:
            self.dataset = PackedDataset(dataset_dir(cfg))
            self.tokenizer_dir = self.dataset.tokenizer_dir
            self.tokenizer = Tokenizer.load(self.tokenizer_dir)
        self.hf = None  # {"family", "dtype"} when starting from Hugging Face weights
        initial_value = None
        if cfg.model.init.startswith("hf:"):
            initial_value = self._hf_start(Path(cfg.model.init.removeprefix("hf:")))
        elif cfg.model.init.startswith("run:"):
            initial_value = self._run_start(Path(cfg.model.init.removeprefix("run:")))
        elif t.objective == "grpo":
            raise UserError("training.objective=grpo starts from a trained model — set model.init=run:DIR (e.g. after "
                            "fine-tuning) or model.init=hf:DIR")
        else:
            self.args = resolve(cfg.model, self.tokenizer.vocab_size)
        if t.seq_len > self.args.max_seq_len:
            raise UserError(f"training.seq_len {t.seq_len} exceeds the model's max_seq_len {self.args.max_seq_len} — "
                            "lower it")
        check_layout(self.layout, self.args, t.batch_size, t.seq_len)
        self._check_objective()
        if self.layout.cp > 1 and self.args.is_moe and cfg.moe.aux_loss_coef > 0:
            raise UserError("moe.aux_loss_coef > 0 with cp > 1: the sequence-wise balance loss needs each sequence "
                            "whole, and context parallelism splits it — set moe.aux_loss_coef=0 (the balancing bias "
                            "still balances) or cp=1")
        self.mesh = build_mesh(self.layout, self.accel.type) if self.world_size > 1 else None
        self.saver = BackgroundSaver(checkpoint_group()) if cfg.checkpoint.async_save else None
        self.local_batch = t.batch_size // self.layout.dp
        self.run_dir = Path(distributed.broadcast_text(str(make_run_dir(cfg)), self.accel.device))
        resume = cfg.checkpoint.resume
        if resume not in ("none", "auto") and not (Path(resume) / ".metadata").is_file():  # before run_dir is made
            raise UserError(f"checkpoint.resume: {resume!r} is not a checkpoint directory — "
                            "pass a step-NNNNNNN directory or 'auto'")
        self.loader = self._make_loader()

        # after every check, so that a mistake is the only line printed; the fallback warning from rank 0 only
        self.dtype = self.accel.compute_dtype(t.dtype, warn=distributed.is_main())
        # every rank must compute in the same dtype: on CPU each decided by timing its own matmuls
        bf16_everywhere = distributed.all_reduce(torch.tensor(float(self.dtype == torch.bfloat16)))
        if float(bf16_everywhere) < self.world_size:
            self.dtype = torch.float32
        self.accel.seed(t.seed)
        with torch.device("meta"):
            model = Transformer(self.args)
        self.model = parallelize(model, cfg, self.layout, self.mesh, self.accel.device, seed=t.seed,
                                 compute_dtype=self.dtype, initial_value=initial_value, loss_fn=lm_loss)
        if isinstance(initial_value, HFWeights):  # known once read; a run started from one has it in its meta
            self.hf["dtype"] = str(initial_value.source_dtype).removeprefix("torch.")
        for layer in (layer for part in self.model.parts for layer in expert_layers(part)):
            layer.aux_loss_coef = cfg.moe.aux_loss_coef
        self.optimizers = [build_optimizer(part, cfg.optimizer, self.accel.type) for part in self.model.parts]
        self.step = 0
        # non-finite steps, counted on the device (read at logged steps and checkpoints: no sync per step)
        device = self.accel.device
        self.skipped_steps = torch.zeros((), device=device)
        self.skip_streak = torch.zeros((), device=device)
        self.streak_limit_step = torch.zeros((), dtype=torch.int64, device=device)  # step the limit was hit, 0 = not

    def _make_loader(self):
        """The batches of this rank (zili.data.loader.Loader; the GRPO trainer's prompts)."""
        t = self.cfg.training
        return Loader(self.dataset, t.seq_len, t.batch_size, t.seed, self.cfg.data.val_fraction,
                      rank=dp_rank(self.mesh) if self.mesh else 0, world_size=self.layout.dp)

    def _check_objective(self) -> None:
        """The objective fits the dataset (conversations for sft, text for lm, none for grpo) and the layout and
        model can train packed conversations or rollouts (no pipeline or context parallelism, no multi-token
        prediction, yet)."""
        t = self.cfg.training
        kind = self.dataset.kind if self.dataset is not None else None
        if t.objective == "sft" and kind != "chat":
            raise UserError(f"training.objective=sft needs a chat dataset, but {self.dataset.directory} holds plain "
                            "text — prepare conversations with `zili data prepare --format chat ...`")
        if t.objective == "lm" and kind == "chat":
            raise UserError(f"{self.dataset.directory} holds conversations (a chat dataset) — set "
                            "training.objective=sft to fine-tune on them")
        if t.objective == "lm":
            return
        if self.layout.pp > 1 or self.layout.cp > 1:
            raise UserError(f"training.objective={t.objective} does not run with "
                            f"{'pp' if self.layout.pp > 1 else 'cp'} > 1 yet (each sequence must be whole on one rank) "
                            "— use data, tensor and expert parallelism")
        if self.args.mtp_depth:
            raise UserError(f"training.objective={t.objective} with multi-token prediction (model.mtp_depth=1) is not "
                            "supported — set model.mtp_depth=0")

    def _run_start(self, run_dir: Path) -> checkpoint.CheckpointWeights:
        """Architecture and weights from a zili run's newest checkpoint (model.init=run:DIR); its tokenizer must be
        the dataset's. Its Hugging Face origin, if any, carries over (export writes the same family)."""
        self._no_overrides()
        if not run_dir.is_dir():
            raise UserError(f"model.init=run:{run_dir}: no such run directory — pass the directory `zili train` or "
                            "`zili import-hf` wrote")
        path = checkpoint.resolve(run_dir)
        meta = checkpoint.read_meta(path)
        self.args = ModelArgs(**meta["model"])
        if self.cfg.model.mtp_depth is not None:
            self.args.mtp_depth = self.cfg.model.mtp_depth
        self._check_tokenizer(run_dir / "tokenizer", run_dir)
        if meta.get("hf"):
            self.hf = dict(meta["hf"])
        return checkpoint.CheckpointWeights(path)

    def _no_overrides(self) -> None:
        overrides = [k for k, v in vars(self.cfg.model).items()
                     if k not in ("preset", "init", "mtp_depth") and v is not None]
        if overrides:
            raise UserError(f"model.{overrides[0]} cannot be combined with model.init={self.cfg.model.init!r} — the "
                            "architecture comes from the checkpoint; drop the override")

    def _check_tokenizer(self, theirs_dir: Path, source: Path) -> None:
        """UserError unless the dataset was prepared with the tokenizer in `theirs_dir` (that of `source`); without a
        dataset (grpo) that tokenizer is the run's."""
        if self.dataset is None:
            self.tokenizer_dir, self.tokenizer = theirs_dir, Tokenizer.load(theirs_dir)
        theirs, ours = theirs_dir / "tokenizer.json", self.tokenizer_dir / "tokenizer.json"
        if (not theirs.is_file()
                or json.loads(theirs.read_text()).get("model") != json.loads(ours.read_text()).get("model")):
            raise UserError(f"the dataset {self.dataset.directory} was not tokenized with {source}'s tokenizer — "
                            f"prepare it with `zili data prepare --tokenizer {theirs_dir} ...`")
        if self.tokenizer.vocab_size > self.args.vocab_size:
            raise UserError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but {source} only "
                            f"{self.args.vocab_size} embeddings — the checkpoint and its tokenizer do not match")

    def _hf_start(self, hf_dir: Path):
        """Architecture from HF_DIR's config.json; the weights source for `parallelize` (model.init=hf:DIR)."""
        self._no_overrides()
        self.args, family = args_from_config(read_config(hf_dir))
        self.args.mtp_depth = self.cfg.model.mtp_depth or 0  # the checkpoint's MTP layer, when asked for
        self.args.validate()
        self._check_tokenizer(hf_dir, hf_dir)
        self.hf = {"family": family, "source": str(hf_dir.resolve())}
        with torch.device("meta"):
            return HFWeights(hf_dir, Transformer(self.args))

    # ---- state -------------------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, torch.Tensor]:
        """Replicated on every rank (same seed, same global position), so DCP stores one copy."""
        loader = self.loader.state_dict()
        state = {
            "step": torch.tensor(self.step),
            "loader_position": torch.tensor(loader["position"]),
            "loader_epoch": torch.tensor(loader["epoch"]),
            "skipped_steps": self.skipped_steps.detach().to("cpu", copy=True),
        }
        for name, value in self.accel.rng_state().items():
            state[f"rng_{name}"] = value
        return state

    def resume_template(self, path: Path) -> dict[str, torch.Tensor]:
        """`trainer_state()`'s entries to load from checkpoint `path`, each with the shape it has there: the RNG
        entries are whichever `rng_*` the checkpoint holds (`rng_cpu` always; `rng_device` and `rng_device_type`,
        or a device-typed key from before them), shaped as saved — a device generator's state has its own size
        per device type, and the checkpoint may come from another type than this run's."""
        template = {k: v for k, v in self.trainer_state().items() if not k.startswith("rng_") or k == "rng_cpu"}
        for name, (shape, dtype) in checkpoint.saved_tensors(path, "trainer.").items():
            if name.startswith("rng_") and name != "rng_cpu":
                template[name] = torch.empty(shape, dtype=dtype)
        return template

    def save(self) -> None:
        self.check_skips()  # a run past its skip limit writes nothing more: the last good checkpoint stays
        meta = {"zili_version": __version__, "model": self.args.to_dict(), "layout": self.layout.describe()}
        if self.hf:
            meta["hf"] = self.hf  # export-hf writes the same family, in the source dtype
        if self.dataset is not None:
            meta["data"] = self.data_identity()  # what the loader position counts; checked on resume
        if self.saver is None:
            checkpoint.save(self.run_dir, self.step, self.model.parts, self.optimizers, self.trainer_state(), meta,
                            self.cfg.checkpoint.keep)
        else:  # staged now, written while the next steps run (zili.checkpoint.background)
            self.saver.save(self.run_dir, self.step, self.model.parts, self.optimizers, self.trainer_state(), meta,
                            self.cfg.checkpoint.keep)

    def data_identity(self) -> dict:
        """What the loader's position counts (a checkpoint's meta.json `data`, `checkpoint.check_same_data`): the
        dataset's content (zili.data.manifest.fingerprint) and path, training.seq_len, data.val_fraction and
        training.seed; batch_size too, for the record (the position counts sequences, so it may change)."""
        t = self.cfg.training
        return {"dataset": fingerprint(self.dataset.manifest), "path": str(self.dataset.directory),
                "seq_len": t.seq_len, "val_fraction": self.cfg.data.val_fraction, "seed": t.seed,
                "batch_size": t.batch_size}

    def maybe_resume(self) -> None:
        resume = self.cfg.checkpoint.resume
        if resume == "none" and restart_count():  # torchrun restarted the job: go on from the newest checkpoint
            resume = "auto"
        if resume == "none":
            return
        if resume == "auto":
            path = checkpoint.latest(self.run_dir)  # the newest intact one, damaged ones skipped with a warning
            if path is None:
                return
        else:
            path = Path(resume)  # a checkpoint directory: checked in __init__
            checkpoint.require_usable(path)
        checkpoint.check_compatible(path, self.args.to_dict())
        checkpoint.check_same_data(path, self.data_identity() if self.dataset is not None else None)
        state = checkpoint.load(path, self.model.parts, self.optimizers, self.resume_template(path),
                                optional=("skipped_steps",))  # checkpoints from before skipping existed
        self.step = int(state["step"])
        self.loader.load_state_dict({"position": int(state["loader_position"]), "epoch": int(state["loader_epoch"])})
        self.skipped_steps.fill_(float(state.get("skipped_steps", 0)))
        self.accel.set_rng_state({k[4:]: v for k, v in state.items() if k.startswith("rng_")},
                                 warn=distributed.is_main())
        if distributed.is_main():
            print(f"resumed from {path} at step {self.step}")

    # ---- one step ----------------------------------------------------------------------------------
    def autocast(self):
        return self.accel.autocast(self.dtype)

    def _global_mean(self, local: torch.Tensor) -> float:
        """The mean over the global batch of per-rank mean losses (host sync)."""
        if self.world_size == 1:
            return float(local)
        contribution = local if self.model.has_last_stage else torch.zeros_like(local)
        # every rank of a stage holds a mean over equally many tokens: its dp slice, its cp chunks, once per tp rank
        return float(distributed.all_reduce(contribution)) / (self.layout.dp * self.layout.cp * self.layout.tp)

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean loss over the fixed validation batches (nats/token); None without a validation split."""
        if not self.loader.n_val:
            return None
        self.model.train(False)
        total = torch.zeros((), device=self.accel.device)
        count = 0
        for batch in self.loader.val_batches(self.cfg.training.eval_batches):
            inputs, targets, *documents = (self.accel.to_device(t) for t in batch)  # documents: chat datasets
            total += forward_backward(self.model, inputs, targets, micro_batch=inputs.shape[0],
                                      autocast=self.autocast, train=False,
                                      documents=documents[0] if documents else None)[0]
            count += 1
        self.model.train(True)
        return self._global_mean(total / count)

    def validation(self) -> dict[str, float | None]:
        """The validation figures of a logged step: {"val_loss": nats/token}."""
        return {"val_loss": self.validate()}

    def step_once(self) -> StepResult:
        """One optimizer step on the loader's next batch."""
        return self.train_step(*self.loader.next_batch())

    def train_step(self, inputs, targets, documents=None) -> StepResult:
        """One step of the ONE train step (zili.train.step), then the skip counters. `documents`: the document
        ids of packed conversations (a chat dataset's batches)."""
        inputs, targets = self.accel.to_device(inputs), self.accel.to_device(targets)
        documents = self.accel.to_device(documents) if documents is not None else None
        t = self.cfg.training
        result = train_step(self.model, self.optimizers, inputs, targets, autocast=self.autocast,
                            micro_batch=t.micro_batch_size or self.local_batch, grad_clip=t.grad_clip,
                            bias_update_rate=self.cfg.moe.bias_update_rate,
                            mtp_weight=t.mtp_loss_weight if self.args.mtp_depth else 0.0, documents=documents)
        self.count_skips(result)
        return result

    def count_skips(self, result: StepResult) -> None:
        """Add a step to the non-finite-step counters (on the device: no host sync)."""
        self.skipped_steps += result.skipped
        self.skip_streak = (self.skip_streak + 1) * result.skipped
        reached = (self.streak_limit_step == 0) & (self.skip_streak >= self.cfg.training.max_skipped_steps)
        self.streak_limit_step = torch.where(reached, self.step + 1, self.streak_limit_step)

    def check_skips(self) -> None:
        """UserError once `training.max_skipped_steps` consecutive steps were non-finite (host sync)."""
        at = int(self.streak_limit_step)
        if at:
            found = checkpoint.list_checkpoints(self.run_dir)
            last = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written"
            raise UserError(f"{self.cfg.training.max_skipped_steps} consecutive steps up to step {at} had a non-finite "
                            f"loss or gradient norm and were skipped; {last} — lower optimizer.lr, raise "
                            "optimizer.warmup_steps or check the data, then resume")

    def global_batch_ids(self) -> list[int]:
        """The sequence ids every data-parallel rank consumed in the last step, in global-batch order."""
        local = torch.tensor(self.loader.last_batch_ids, dtype=torch.int64, device=self.accel.device)
        rows = distributed.all_gather_rows(local)  # ranks ordered (pp, dp_replicate, dp_shard, cp, tp)
        per_dp = self.layout.cp * self.layout.tp
        return rows[0 : self.layout.dp * per_dp : per_dp].flatten().tolist()

    # ---- loop --------------------------------------------------------------------------------------
    def prepare_run_dir(self) -> None:
        unwritable = None  # rank 0's reason, if it cannot create the run directory: every rank then stops below
        if distributed.is_main():
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.run_dir / "config.toml", self.cfg.to_toml())
                tok_dir = self.run_dir / "tokenizer"
                if not tok_dir.exists():
                    with atomic_dir(tok_dir) as tmp:
                        shutil.copytree(self.tokenizer_dir, tmp, dirs_exist_ok=True)
            except OSError as e:  # a file in the way, no permission, a read-only or full filesystem
                unwritable = (f"training.run_dir {str(self.run_dir)!r} cannot be written ({e.strerror or e}: "
                              f"{e.filename}) — pick a directory you can write to")
        distributed.barrier()
        # every rank writes its checkpoint shards under run_dir: it must be one directory for all of them
        missing = torch.tensor(0.0 if (self.run_dir / "config.toml").is_file() else 1.0)
        if float(distributed.all_reduce(missing)):
            raise UserError(unwritable or f"training.run_dir {str(self.run_dir)!r} is not visible to every rank — put "
                            "it on a filesystem shared by all nodes (and give an absolute path)")

    def run(self) -> Path:
        cfg, t = self.cfg, self.cfg.training
        self.prepare_run_dir()
        self.maybe_resume()
        main = distributed.is_main()
        log = MetricsLog(self.run_dir, t.steps, self.step, enabled=main, progress=cfg.metrics.progress,
                         tensorboard=cfg.metrics.tensorboard)
        flops = flops_per_token(self.args, t.seq_len)
        # per-device peak from rank 0 (on CPU a measured probe: one rank measures, not all at once)
        peak_here = torch.tensor(self.accel.peak_flops(self.dtype) / 1e12 if main else 0.0)  # TFLOP/s, fp32
        peak = float(distributed.all_reduce(peak_here)) * 1e12 * self.world_size
        tokens_per_step = t.batch_size * t.seq_len  # global: all ranks together

        if self.step == 0 and t.eval_every and self.loader.n_val:
            log.write({"step": 0, "loss": None, "lr": None, "grad_norm": None, "tokens_per_s": None,
                       "mfu": None, "peak_mem_gb": None, "skipped_steps": None, **self.validation()})
        stop = StopRequest()
        stop.install()
        try:
            started_at = self.step
            timed_tokens, timer, overhead = 0, time.perf_counter(), 0.0  # tokens/s excludes eval and checkpoints
            while self.step < t.steps:
                lr = lr_at(self.step, t.steps, cfg.optimizer)
                for optimizer in self.optimizers:
                    set_lr(optimizer, lr)
                result = self.step_once()
                self.step += 1
                timed_tokens += tokens_per_step if result.tokens is None else result.tokens
                log.advance()
                faults.inject(self.step, distributed.rank())
                last = self.step == t.steps
                preempted = stop.agreed() and not last
                stopping = preempted or (bool(t.exit_after) and self.step - started_at >= t.exit_after and not last)
                if self.step % cfg.metrics.log_every == 0 or last or stopping:
                    loss_value = self._global_mean(result.loss)  # host sync (and stop.agreed, each step under torchrun)
                    tokens_per_s = timed_tokens / (time.perf_counter() - timer - overhead)
                    peak_mem = float(distributed.all_reduce(torch.tensor(self.accel.peak_memory_gb()), op="max"))
                    record = {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": float(result.grad_norm),
                              "tokens_per_s": tokens_per_s, "mfu": flops * tokens_per_s / peak, "peak_mem_gb": peak_mem,
                              "skipped_steps": int(self.skipped_steps)}
                    timed_tokens, timer, overhead = 0, time.perf_counter(), 0.0
                    record.update({k: float(v) for k, v in (result.metrics or {}).items()})
                    if t.eval_every and (self.step % t.eval_every == 0 or last) and self.loader.n_val:
                        record.update(self.validation())
                    if self.args.is_moe:  # this step's, busiest expert ÷ mean, worst layer of every stage
                        here = result.expert_load if result.expert_load is not None else torch.zeros(())
                        record["expert_load"] = float(distributed.all_reduce(here, op="max"))
                    if result.mtp_loss is not None:
                        record["mtp_loss"] = float(result.mtp_loss)
                    if cfg.metrics.log_sequence_ids:
                        record["sequence_ids"] = self.global_batch_ids()
                    log.write(record)
                    self.check_skips()
                    overhead += time.perf_counter() - timer
                if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or last or stopping:
                    begin = time.perf_counter()
                    self.save()
                    if self.saver is not None and (last or stopping):
                        self.saver.wait()  # the run ends: its last checkpoint complete first
                    overhead += time.perf_counter() - begin
                if stopping:
                    if main:
                        why = "on a stop signal" if preempted else f"(training.exit_after={t.exit_after})"
                        print(f"stopping after step {self.step} {why}; continue with --checkpoint.resume=auto "
                              f"--training.run_dir={self.run_dir}", flush=True)
                    return self.run_dir
        finally:
            stop.restore()
            log.close()
        return self.run_dir

    def sample(self) -> str:
        """Generate `sample_tokens` tokens from `sample_prompt` with the trained model (single process only)."""
        t = self.cfg.training
        model = self.model.parts[0]
        prompt = self.tokenizer.encode(t.sample_prompt) or [self.tokenizer.eos_id]
        model.eval()
        with self.accel.autocast(self.dtype):
            new = generate(model, prompt, t.sample_tokens, temperature=0.8, top_p=0.95, seed=t.seed,
                           eos_id=self.tokenizer.eos_id)
        model.train()
        return self.tokenizer.decode(prompt + new)

