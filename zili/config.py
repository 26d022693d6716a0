"""Run configuration: typed dataclass sections, TOML in and out, `--section.key=value` overrides.

Contract:
- `load_config(path, overrides)` returns a validated `Config`; any mistake raises `UserError` with one
  line naming the key and what is allowed.
- The defaults ARE the demo: `zili train` with no arguments trains the `tiny` preset on the demo corpus.
- `Config.to_toml()` writes the resolved config; `load_config` of that file gives the same config back.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from zili.errors import UserError
from zili.models.presets import resolve


def _f(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ModelConfig:
    preset: str = _f("tiny", "named architecture (see `zili.models.presets`)")
    n_layers: int | None = _f(None, "override the preset's number of decoder blocks")
    dim: int | None = _f(None, "override the hidden size")
    n_heads: int | None = _f(None, "override the number of attention (query) heads")
    n_kv_heads: int | None = _f(None, "override the number of key/value heads (GQA); must divide n_heads")
    ffn_dim: int | None = _f(None, "override the SwiGLU inner size")
    vocab_size: int | None = _f(None, "override the vocabulary size (tiny: taken from the tokenizer)")
    rope_theta: float | None = _f(None, "override the RoPE base")
    qkv_bias: bool | None = _f(None, "override: bias on the q/k/v projections (Qwen2 style)")
    tied_embeddings: bool | None = _f(None, "override: share the input embedding with the output head")
    head_size: int | None = _f(None, "override the features per attention head (0 = dim / n_heads)")
    qk_norm: bool | None = _f(None, "override: RMSNorm over each query and key head (Qwen3 style)")
    attention: str | None = _f(None, "override the attention: 'gqa' (grouped-query) or 'mla' (multi-head latent)",
                               ("gqa", "mla"))
    q_lora_rank: int | None = _f(None, "MLA: rank of the query projection (0 = a plain projection)")
    kv_lora_rank: int | None = _f(None, "MLA: features of the compressed key/value latent")
    qk_nope_head_dim: int | None = _f(None, "MLA: unrotated query/key features per head")
    qk_rope_head_dim: int | None = _f(None, "MLA: rotated query/key features per head (shared key)")
    v_head_dim: int | None = _f(None, "MLA: value features per head")
    n_routed_experts: int | None = _f(None, "mixture of experts: routed experts per MoE block (0 = dense)")
    n_shared_experts: int | None = _f(None, "mixture of experts: shared experts every token passes through")
    top_k: int | None = _f(None, "mixture of experts: routed experts per token")
    moe_ffn_dim: int | None = _f(None, "mixture of experts: SwiGLU inner size of one expert")
    n_dense_layers: int | None = _f(None, "mixture of experts: leading blocks that keep a dense MLP")
    score_func: str | None = _f(None, "routing scores: 'softmax' (Qwen3-MoE) or 'sigmoid' with the balancing bias "
                                      "(DeepSeek-V3)", ("softmax", "sigmoid"))
    n_group: int | None = _f(None, "sigmoid routing: expert groups")
    topk_group: int | None = _f(None, "sigmoid routing: groups a token may use")
    routed_scaling_factor: float | None = _f(None, "mixture of experts: multiplies the routed experts' weights")
    mtp_depth: int | None = _f(None, "multi-token prediction (DeepSeek-V3): 1 = an extra block predicting the token "
                                     "after next; 0 = off")
    init: str = _f("", "initial weights: '' = random from training.seed; 'hf:DIR' = a Hugging Face Llama, Qwen2, "
                       "Qwen3, Qwen3-MoE or DeepSeek-V3 checkpoint (its config.json sets the architecture — only "
                       "mtp_depth may be added; prepare the data with its tokenizer); 'run:DIR' = the newest "
                       "checkpoint of a zili run (weights only: a fine-tuning starts at step 0; same tokenizer)")


@dataclass
class DataConfig:
    dataset: str = _f("demo", "'demo' (Shakespeare, prepared on first use) or a directory from `zili data prepare`")
    val_fraction: float = _f(0.01, "fraction of the packed sequences held out for validation")


@dataclass
class TrainingConfig:
    objective: str = _f("lm", "'lm': next-token loss on every token (pretraining); 'sft': on the assistant tokens "
                              "of a chat dataset, conversations packed apart; 'grpo': reinforcement learning on "
                              "the [rl] prompts and rewards (docs/post-training.md)", ("lm", "sft", "grpo"))
    steps: int = _f(400, "optimizer steps to train")
    seed: int = _f(1234, "seed for initialisation, data order and sampling")
    device: str = _f("auto", "'auto' or a torch device string (cpu, cuda, cuda:1, npu, xpu, mps ...)")
    batch_size: int = _f(16, "global batch, in sequences, per optimizer step (all data-parallel ranks together)")
    micro_batch_size: int = _f(0, "sequences per forward/backward on each data-parallel rank; "
                                  "0 = its whole share (no accumulation)")
    seq_len: int = _f(256, "tokens per training sequence")
    dtype: str = _f("bf16", "compute dtype under autocast; master weights stay fp32", ("bf16", "fp32"))
    run_dir: str = _f("", "where config, metrics and checkpoints go; empty = runs/<timestamp>")
    activation_checkpointing: bool = _f(False, "recompute each block's activations in the backward pass")
    compile: bool = _f(False, "torch.compile each decoder block")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this; 0 = off")
    eval_every: int = _f(100, "validate every N steps (and at step 0 and the end); 0 = never")
    eval_batches: int = _f(4, "batches of `batch_size` sequences per validation")
    exit_after: int = _f(0, "stop (after a checkpoint) once this many steps ran in this process; 0 = off")
    max_skipped_steps: int = _f(5, "stop with an error after this many consecutive steps with a non-finite loss or "
                                   "gradient norm (each skips its update)")
    mtp_loss_weight: float = _f(0.3, "weight of the multi-token-prediction loss in the objective (models with "
                                     "model.mtp_depth = 1; DeepSeek-V3 used 0.3, then 0.1)")
    sample_tokens: int = _f(120, "tokens to generate as a sample at the end; 0 = none")
    sample_prompt: str = _f("ROMEO:", "prompt of the final sample")


@dataclass
class OptimizerConfig:
    name: str = _f("adamw", "optimizer", ("adamw",))
    lr: float = _f(3e-3, "peak learning rate")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of lr")
    weight_decay: float = _f(0.1, "decoupled weight decay on matrices (not norms, biases)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    schedule: str = _f("cosine", "learning-rate schedule after warmup", ("cosine", "wsd", "constant"))
    warmup_steps: int = _f(40, "linear warmup steps")
    decay_fraction: float = _f(0.2, "wsd: fraction of all steps spent in the final linear decay")
    implementation: str = _f("auto", "AdamW kernel", ("auto", "fused", "foreach", "for-loop"))


@dataclass
class CheckpointConfig:
    every: int = _f(0, "save every N steps (and always at the end); 0 = only at the end")
    keep: int = _f(2, "keep the newest K complete checkpoints")
    resume: str = _f("none", "'none', 'auto' (newest in run_dir) or a checkpoint directory")
    async_save: bool = _f(False, "stage each checkpoint in host memory and write it in the background while training "
                                 "goes on (DCP's async save; one save in flight at most)")


@dataclass
class MetricsConfig:
    log_every: int = _f(10, "append a line to metrics.jsonl every N steps (and at the last)")
    progress: bool = _f(True, "show a progress bar on the console")
    log_sequence_ids: bool = _f(False, "add the global batch's sequence ids (`sequence_ids`) to each logged step")
    tensorboard: bool = _f(False, "also write each logged step's numbers as TensorBoard scalars to "
                                 "RUN_DIR/tensorboard/ (pip install 'zili[tensorboard]')")


@dataclass
class ParallelismConfig:
    dp_replicate: int = _f(1, "data-parallel replicas (HSDP outer dimension)")
    dp_shard: int = _f(-1, "FSDP shard degree; -1 = whatever the world size leaves")
    tp: int = _f(1, "tensor-parallel degree")
    pp: int = _f(1, "pipeline-parallel degree")
    cp: int = _f(1, "context-parallel degree: each sequence split over cp ranks")
    ep: int = _f(1, "expert-parallel degree: each MoE layer's experts split over ep of the dp_shard x cp ranks")
    pp_schedule: str = _f("1F1B", "pipeline schedule (torch.distributed.pipelining)",
                          ("1F1B", "GPipe", "Interleaved1F1B", "InterleavedZeroBubble"))
    pp_microbatches: int = _f(0, "micro-batches per pipeline step (the local batch is split); 0 = the number of stages")
    pp_stages_per_rank: int = _f(0, "pipeline stages held by each pp rank; 0 = 1 for 1F1B/GPipe, 2 for the others")
    sequence_parallel: bool = _f(True, "with tp > 1, shard norms and residuals along the sequence")
    fsdp_cpu_offload: bool = _f(False, "keep FSDP-sharded parameters, gradients and optimizer state in host memory")


@dataclass
class DistributedConfig:
    timeout_s: float = _f(1800.0, "seconds a collective waits for the other ranks before the run stops with an "
                                  "error naming the rank and the operation (torchrun runs; torch's default: 1800)")


@dataclass
class MoEConfig:
    bias_update_rate: float = _f(0.001, "step of the expert-balancing bias after each optimizer step (sigmoid "
                                        "routing, DeepSeek-V3); 0 = off")
    aux_loss_coef: float = _f(0.0, "weight of the sequence-wise balance loss added to the objective (DeepSeek-V3 "
                                   "used 0.0001); 0 = off")


@dataclass
class RLConfig:
    prompts: str = _f("", "GRPO (training.objective=grpo): JSONL or Parquet file(s) of prompts, comma-separated: "
                          "each record a `prompt` string or `messages`, plus the fields its reward reads (e.g. answer)")
    eval_prompts: str = _f("", "held-out prompts for val_accuracy (greedy), same format; '' = none")
    eval_limit: int = _f(200, "at most this many held-out prompts per validation")
    reward: str = _f("exact_answer", "reward functions, comma-separated: built-ins exact_answer, format, or "
                                     "module:function(prompt, completion, **fields) -> float; summed")
    reward_weights: str = _f("", "weights of the rewards, comma-separated ('' = 1 each)")
    accuracy: str = _f("exact_answer", "the reward whose value >= 0.5 counts as a correct answer (metric only)")
    group_size: int = _f(8, "completions sampled per prompt (G)")
    temperature: float = _f(1.0, "sampling temperature of the rollouts")
    top_p: float = _f(1.0, "nucleus sampling mass of the rollouts")
    max_new_tokens: int = _f(64, "most tokens per completion")
    updates_per_batch: int = _f(1, "optimizer steps on each batch of rollouts (PPO epochs; the ratio is 1 on the "
                                   "first)")
    clip_eps: float = _f(0.2, "PPO clip range below and above 1")
    clip_eps_high: float = _f(0.0, "upper clip range if above clip_eps (DAPO's clip-higher); 0 = clip_eps")
    kl_beta: float = _f(0.0, "weight of the KL penalty to the frozen starting model (k3 estimator); 0 = none")
    scale_by_std: bool = _f(True, "divide advantages by their group's std (false: Dr. GRPO)")
    aggregation: str = _f("token", "loss over the batch's completion tokens ('token', DAPO) or per sequence first "
                                   "('sequence', GRPO)", ("token", "sequence"))
    chat_template: bool = _f(True, "render a `prompt` string as a user turn with the tokenizer's chat template")
    system: str = _f("", "system message put before each prompt rendered with the chat template")


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "optimizer": OptimizerConfig,
    "checkpoint": CheckpointConfig,
    "metrics": MetricsConfig,
    "parallelism": ParallelismConfig,
    "distributed": DistributedConfig,
    "moe": MoEConfig,
    "rl": RLConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def to_toml(self) -> str:
        """The config as TOML (keys left at None, i.e. "the preset's", are omitted)."""
        return tomli_w.dumps({name: {k: v for k, v in dataclasses.asdict(getattr(self, name)).items() if v is not None}
                              for name in SECTIONS})


@functools.cache
def _field_types(cls: type) -> dict[str, type]:
    """Field name -> its type with `| None` removed (`int | None` -> int)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        out[name] = hint
    return out


def _coerce(key: str, kind: type, value, from_text: bool):
    """Convert `value` to `kind`, raising UserError naming `key` when it does not fit."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if from_text and str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise UserError(f"{key}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text:
            try:
                return int(str(value).replace("_", ""))
            except ValueError:
                pass
        raise UserError(f"{key}: expected an integer, got {value!r}")
    if kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif from_text:
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise UserError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # nan and inf pass every `<= 0` check below: refused here, for every key
            raise UserError(f"{key}: expected a finite number, got {value!r}")
        return number
    if isinstance(value, (dict, list)):
        raise UserError(f"{key}: expected a string, got {value!r}")
    return str(value)


def _set(cfg: Config, key: str, value, from_text: bool) -> None:
    section_name, _, name = key.partition(".")
    if section_name not in SECTIONS or not name:
        raise UserError(f"unknown config key '{key}' — sections are: {', '.join(SECTIONS)} (e.g. training.steps)")
    section = getattr(cfg, section_name)
    fields = {f.name: f for f in dataclasses.fields(section)}
    if name not in fields:
        raise UserError(f"unknown config key '{key}' — [{section_name}] has: {', '.join(fields)}")
    f = fields[name]
    coerced = _coerce(key, _field_types(type(section))[name], value, from_text)
    choices = f.metadata.get("choices")
    if choices and coerced not in choices:
        raise UserError(f"{key}: {coerced!r} is not allowed — choose one of {', '.join(choices)}")
    setattr(section, name, coerced)


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """`['--training.steps=5', '--optimizer.lr', '1e-3']` -> [('training.steps', '5'), ('optimizer.lr', '1e-3')]."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise UserError(f"unexpected argument '{arg}' — overrides look like --section.key=value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            key, value = arg[2:], args[i + 1]
            i += 1
        else:
            raise UserError(f"'{arg}' needs a value — write {arg}=VALUE")
        pairs.append((key, value))
        i += 1
    return pairs


def load_config(path: str | Path | None = None, overrides: list[tuple[str, str]] = ()) -> Config:
    """Defaults, then the TOML file (if any), then the overrides; validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {str(path)!r} not found — pass an existing TOML file to --config")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:  # TOML is UTF-8 text
            raise UserError(f"{path}: not valid TOML ({e}) — fix the file") from None
        for section_name, table in data.items():
            if not isinstance(table, dict):
                raise UserError(f"{path}: '{section_name}' must be a [section] table — "
                                f"sections are: {', '.join(SECTIONS)}")
            for name, value in table.items():
                _set(cfg, f"{section_name}.{name}", value, from_text=False)
    for key, value in overrides:
        _set(cfg, key, value, from_text=True)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range checks that do not need the model or the device; raise UserError on the first problem."""
    t, o, c, m = cfg.training, cfg.optimizer, cfg.checkpoint, cfg.metrics
    positive = {
        "training.steps": t.steps, "training.batch_size": t.batch_size, "training.seq_len": t.seq_len,
        "optimizer.lr": o.lr, "checkpoint.keep": c.keep, "metrics.log_every": m.log_every,
        "training.max_skipped_steps": t.max_skipped_steps, "distributed.timeout_s": cfg.distributed.timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"{key} must be positive, got {value}")
    non_negative = {
        "training.micro_batch_size": t.micro_batch_size, "training.grad_clip": t.grad_clip,
        "training.eval_every": t.eval_every, "training.exit_after": t.exit_after,
        "training.sample_tokens": t.sample_tokens, "parallelism.pp_microbatches": cfg.parallelism.pp_microbatches,
        "parallelism.pp_stages_per_rank": cfg.parallelism.pp_stages_per_rank, "optimizer.weight_decay": o.weight_decay,
        "optimizer.warmup_steps": o.warmup_steps, "optimizer.eps": o.eps, "checkpoint.every": c.every,
        "training.mtp_loss_weight": t.mtp_loss_weight, "moe.bias_update_rate": cfg.moe.bias_update_rate,
        "moe.aux_loss_coef": cfg.moe.aux_loss_coef,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise UserError(f"{key} must be >= 0, got {value}")
    if t.eval_every and t.eval_batches <= 0:
        raise UserError(f"training.eval_batches must be positive when validating, got {t.eval_batches}")
    for key, value in {"optimizer.beta1": o.beta1, "optimizer.beta2": o.beta2}.items():
        if not 0.0 <= value < 1.0:
            raise UserError(f"{key} must be in [0, 1), got {value}")
    for key, value in {"optimizer.min_lr_ratio": o.min_lr_ratio, "optimizer.decay_fraction": o.decay_fraction}.items():
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{key} must be in [0, 1], got {value}")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    if t.micro_batch_size and t.batch_size % t.micro_batch_size:
        raise UserError(
            f"training.batch_size ({t.batch_size}) must be a multiple of "
            f"training.micro_batch_size ({t.micro_batch_size})"
        )
    par = cfg.parallelism
    for key in ("dp_replicate", "tp", "pp", "cp", "ep"):
        if getattr(par, key) <= 0:
            raise UserError(f"parallelism.{key} must be positive, got {getattr(par, key)}")
    if par.dp_shard == 0 or par.dp_shard < -1:
        raise UserError(f"parallelism.dp_shard must be positive or -1 (the rest of the world), got {par.dp_shard}")
    for key in ("n_layers", "dim", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
        value = getattr(cfg.model, key)
        if value is not None and value <= 0:
            raise UserError(f"model.{key} must be positive, got {value}")
    if cfg.model.rope_theta is not None and cfg.model.rope_theta <= 0:
        raise UserError(f"model.rope_theta must be positive, got {cfg.model.rope_theta}")
    if cfg.model.init and not cfg.model.init.startswith(("hf:", "run:")):
        raise UserError(f"model.init {cfg.model.init!r} is not understood — use '' (random), 'hf:DIR' or 'run:DIR'")
    if cfg.model.init:
        return  # the architecture comes from the Hugging Face config.json or the run's checkpoint
    resolve(cfg.model, tokenizer_vocab=1)  # architecture checks now, before any data is read


def describe() -> str:
    """Every key with its default and help, for `zili train --help`."""
    lines = []
    defaults = Config()
    for name, cls in SECTIONS.items():
        lines.append(f"[{name}]")
        for f in dataclasses.fields(cls):
            default = getattr(getattr(defaults, name), f.name)
            shown = "(preset)" if default is None else tomli_w.dumps({"v": default})[4:].strip()
            choices = f.metadata.get("choices")
            extra = f" {{{', '.join(choices)}}}" if choices else ""
            lines.append(f"  --{name}.{f.name:<26} {shown:<10} {f.metadata.get('help', '')}{extra}")
    return "\n".join(lines)
