"""Hugging Face interop in one place: config.json <-> ModelArgs and parameter names, per model family.

Families: `qwen2` (Qwen2ForCausalLM: q/k/v bias, usually tied embeddings) and `llama`
(LlamaForCausalLM: Llama 3 rope scaling, GQA, usually untied). Both use the same decoder, so one name map
serves both:

    embed.weight                      <-> model.embed_tokens.weight
    blocks.N.attn_norm.weight         <-> model.layers.N.input_layernorm.weight
    blocks.N.attn.{q,k,v,o}_proj.*    <-> model.layers.N.self_attn.{q,k,v,o}_proj.*
    blocks.N.mlp_norm.weight          <-> model.layers.N.post_attention_layernorm.weight
    blocks.N.mlp.{gate,up,down}_proj.*<-> model.layers.N.mlp.{gate,up,down}_proj.*
    norm.weight                       <-> model.norm.weight
    lm_head.weight                    <-> lm_head.weight   (absent when tied)

Rotary layout: zili rotates the feature pairs (i, i + head_dim/2) — the half-split ("rotate_half") layout
of Hugging Face's Llama and Qwen2 code — so q_proj/k_proj rows are copied as they are. Meta's original
Llama checkpoints pair (2i, 2i+1) instead; converting those needs the well-known row permutation of q and
k, which is the classic source of silently wrong conversions. zili reads only Hugging Face-format
checkpoints, which are already half-split, so no permutation happens anywhere.

config.json is read in both forms: classic (`rope_theta`, `rope_scaling` — what published checkpoints
carry) and transformers 5's `rope_parameters`.
"""

from __future__ import annotations

import json
from pathlib import Path

from zili.errors import UserError
from zili.models.args import ModelArgs

ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
MODEL_TYPES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}

_BLOCK = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn": "self_attn", "mlp": "mlp"}
_BLOCK_BACK = {v: k for k, v in _BLOCK.items()}
_TOP = {"embed": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
_TOP_BACK = {v: k for k, v in _TOP.items()}


def hf_name(name: str) -> str:
    """zili parameter name -> Hugging Face name."""
    parts = name.split(".")
    if parts[0] == "blocks":
        return ".".join(["model", "layers", parts[1], _BLOCK[parts[2]], *parts[3:]])
    return ".".join([_TOP[parts[0]], *parts[1:]])


def zili_name(name: str) -> str:
    """Hugging Face parameter name -> zili name (KeyError for names zili has no place for)."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        return ".".join(["blocks", parts[2], _BLOCK_BACK[parts[3]], *parts[4:]])
    for prefix, short in _TOP_BACK.items():
        if name.startswith(prefix + "."):
            return short + name[len(prefix):]
    raise KeyError(name)


def read_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{path} not found — pass a Hugging Face model directory (config.json + *.safetensors)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}) — fix or re-download it") from None


def family_of(config: dict) -> str:
    """'qwen2' or 'llama'; UserError naming the architecture otherwise."""
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    if not archs and config.get("model_type") in MODEL_TYPES:
        return config["model_type"]
    what = ", ".join(archs) or f"model_type {config.get('model_type')!r}"
    raise UserError(f"unsupported architecture {what} — zili imports {', '.join(ARCHITECTURES)}")


def _rope(config: dict) -> dict:
    """RoPE fields of ModelArgs from either config form."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    source = params if params.get("rope_type") else scaling
    if kind == "default":
        return {"rope_theta": float(theta), "rope_scaling": "none"}
    if kind != "llama3":
        raise UserError(f"rope scaling {kind!r} is not supported — zili implements the default and 'llama3' RoPE")
    return {"rope_theta": float(theta), "rope_scaling": "llama3", "rope_factor": float(source["factor"]),
            "rope_low_freq_factor": float(source["low_freq_factor"]),
            "rope_high_freq_factor": float(source["high_freq_factor"]),
            "rope_original_max_len": int(source["original_max_position_embeddings"])}


def args_from_config(config: dict) -> tuple[ModelArgs, str]:
    """(ModelArgs, family) for a Hugging Face config.json dict; UserError for what zili cannot represent."""
    family = family_of(config)
    try:
        dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        args = ModelArgs(
            n_layers=int(config["num_hidden_layers"]), dim=dim, n_heads=heads,
            n_kv_heads=int(config.get("num_key_value_heads") or heads), ffn_dim=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            qkv_bias=family == "qwen2" or bool(config.get("attention_bias", False)),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_seq_len=int(config.get("max_position_embeddings", 4096)),
            **_rope(config),
        )
    except KeyError as e:
        raise UserError(f"config.json lacks {e.args[0]!r} — "
                        f"it is not a complete {MODEL_TYPES[family]} config") from None
    if config.get("head_dim") not in (None, args.head_dim):
        raise UserError(f"head_dim {config['head_dim']} differs from hidden_size / num_attention_heads — not supported")
    if family == "llama" and args.qkv_bias:
        raise UserError("attention_bias=true (a bias on o_proj as well) is not supported — zili has q/k/v bias only")
    if config.get("hidden_act", "silu") != "silu" or config.get("mlp_bias"):
        raise UserError("only SwiGLU MLPs with silu and no bias are supported")
    return args.validate(), family


def config_from_args(args: ModelArgs, family: str, torch_dtype: str = "float32", eos_id: int | None = None) -> dict:
    """A config.json dict in the classic form (rope_theta / rope_scaling), which every loader reads."""
    config = {
        "architectures": [MODEL_TYPES[family]], "model_type": family,
        "vocab_size": args.vocab_size, "hidden_size": args.dim, "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "tie_word_embeddings": args.tied_embeddings,
        "torch_dtype": torch_dtype, "use_cache": True,
    }
    if family == "llama":
        config.update({"attention_bias": args.qkv_bias, "mlp_bias": False})
    if args.rope_scaling == "llama3":
        config["rope_scaling"] = {"rope_type": "llama3", "factor": args.rope_factor,
                                  "low_freq_factor": args.rope_low_freq_factor,
                                  "high_freq_factor": args.rope_high_freq_factor,
                                  "original_max_position_embeddings": args.rope_original_max_len}
    if eos_id is not None:
        config["eos_token_id"] = eos_id
    return config
