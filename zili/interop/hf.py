"""Hugging Face interop in one place: config.json <-> ModelArgs and tensor names, per model family.

Families (architecture -> family): `Qwen2ForCausalLM` -> qwen2 (q/k/v bias, usually tied embeddings),
`LlamaForCausalLM` -> llama (Llama 3 rope scaling, GQA, usually untied), `Qwen3ForCausalLM` -> qwen3 (per-head
q/k RMSNorm, explicit head_dim), `Qwen3MoeForCausalLM` -> qwen3_moe (Qwen3 with every MLP a mixture of experts,
softmax routing) and `DeepseekV3ForCausalLM` -> deepseek_v3 (multi-head latent attention, YaRN, sigmoid routing
over expert groups with a balancing bias, shared experts, dense first blocks). One name map serves them all:

    embed.weight                        <-> model.embed_tokens.weight
    blocks.N.attn_norm.weight           <-> model.layers.N.input_layernorm.weight
    blocks.N.attn.X                     <-> model.layers.N.self_attn.X  (q/k/v/o_proj, q_norm, k_norm; MLA's
                                            q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm,
                                            kv_b_proj)
    blocks.N.mlp_norm.weight            <-> model.layers.N.post_attention_layernorm.weight
    blocks.N.mlp.X                      <-> model.layers.N.mlp.X  ({gate,up,down}_proj; gate.weight,
                                            gate.e_score_correction_bias, shared_experts.*)
    blocks.N.mlp.experts.w_gate [E,f,d] <-> model.layers.N.mlp.experts.{0..E-1}.gate_proj.weight [f,d] each
                     (w_up -> up_proj, w_down [E,d,f] -> down_proj [d,f])
    norm.weight                         <-> model.norm.weight
    lm_head.weight                      <-> lm_head.weight   (absent when tied)
    mtp.0.{enorm,hnorm,eh_proj}.weight  <-> model.layers.L.{enorm,hnorm,eh_proj}.weight  (L = num_hidden_layers)
    mtp.0.norm.weight                   <-> model.layers.L.shared_head.norm.weight
    mtp.0.block.X                       <-> model.layers.L.X  (as blocks.L.X)
    (model.layers.L.embed_tokens.weight and shared_head.head.weight: copies of the embedding and the head)

That is the hub layout on disk — one tensor per expert — which every transformers version reads and writes,
whatever layout it uses in memory (transformers 5 fuses the experts on load and splits them on save).

Rotary layout: zili rotates the feature pairs (i, i + head_dim/2) — the half-split ("rotate_half") layout
of Hugging Face's Llama, Qwen2 and Qwen3 code — so q_proj/k_proj rows are copied as they are. Meta's original
Llama checkpoints pair (2i, 2i+1) instead; converting those needs the well-known row permutation of q and
k, which is the classic source of silently wrong conversions. zili reads only Hugging Face-format
checkpoints, which are already half-split, so no permutation happens anywhere. DeepSeek's MLA weights pair
(2i, 2i+1) in their rope features (`rope_interleave`, as published); zili's MLA takes them as they are and
de-interleaves at run time (zili.models.mla).

config.json is read in both forms: classic (`rope_theta`, `rope_scaling` — what published checkpoints
carry) and transformers 5's `rope_parameters`.
"""

from __future__ import annotations

import json
from pathlib import Path

from zili.errors import UserError
from zili.models.args import ModelArgs

ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3",
                 "Qwen3MoeForCausalLM": "qwen3_moe", "DeepseekV3ForCausalLM": "deepseek_v3"}
MODEL_TYPES = {family: arch for arch, family in ARCHITECTURES.items()}
_EXPERT_PROJ = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
_EXPERT_PROJ_BACK = {v: k for k, v in _EXPERT_PROJ.items()}

_BLOCK = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn": "self_attn", "mlp": "mlp"}
_BLOCK_BACK = {v: k for k, v in _BLOCK.items()}
_TOP = {"embed": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
_TOP_BACK = {v: k for k, v in _TOP.items()}


def is_stacked(name: str) -> bool:
    """Whether zili tensor `name` stacks one Hugging Face tensor per expert along its first dimension."""
    return ".mlp.experts.w_" in name


_MTP = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "norm": "shared_head.norm"}


def hf_name(name: str, expert: int | None = None, n_layers: int | None = None) -> str:
    """zili tensor name -> Hugging Face name; for a stacked expert tensor, that of expert `expert`. Multi-token
    prediction layers (`mtp.I.*`) become DeepSeek's `model.layers.{n_layers + I}.*`, which needs `n_layers`."""
    parts = name.split(".")
    if parts[0] == "mtp":
        layer = n_layers + int(parts[1])
        if parts[2] == "block":
            return hf_name(".".join(["blocks", str(layer), *parts[3:]]), expert)
        return ".".join(["model", "layers", str(layer), _MTP[parts[2]], *parts[3:]])
    if parts[0] == "blocks":
        if is_stacked(name):
            if expert is None:
                raise ValueError(f"{name} stacks one tensor per expert: say which expert")
            return f"model.layers.{parts[1]}.mlp.experts.{expert}.{_EXPERT_PROJ[parts[4]]}.weight"
        return ".".join(["model", "layers", parts[1], _BLOCK[parts[2]], *parts[3:]])
    return ".".join([_TOP[parts[0]], *parts[1:]])


def hf_names(name: str, shape, n_layers: int | None = None) -> list[str]:
    """The Hugging Face tensors zili tensor `name` of `shape` is made of: one, or one per expert (stacked)."""
    if is_stacked(name):
        return [hf_name(name, e, n_layers) for e in range(shape[0])]
    return [hf_name(name, None, n_layers)]


def mtp_copies(n_layers: int, mtp_depth: int) -> dict[str, str]:
    """DeepSeek's MTP layers carry copies of the embedding and the output head: HF name -> zili name."""
    copies = {}
    for i in range(mtp_depth):
        copies[f"model.layers.{n_layers + i}.embed_tokens.weight"] = "embed.weight"
        copies[f"model.layers.{n_layers + i}.shared_head.head.weight"] = "lm_head.weight"
    return copies


def zili_name(name: str) -> str:
    """Hugging Face tensor name -> zili name (KeyError for names zili has no place for); an expert's tensor maps
    to the stacked tensor holding it."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        if parts[3:5] == ["mlp", "experts"] and len(parts) == 8 and parts[5].isdigit() and parts[7] == "weight":
            return f"blocks.{parts[2]}.mlp.experts.{_EXPERT_PROJ_BACK[parts[6]]}"
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
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON, or not UTF-8 text
        raise UserError(f"{path} is not valid JSON ({e}) — fix or re-download it") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} holds a JSON {type(config).__name__}, not an object — fix or re-download it")
    return config


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
    if kind == "llama3":
        return {"rope_theta": float(theta), "rope_scaling": "llama3", "rope_factor": float(source["factor"]),
                "rope_low_freq_factor": float(source["low_freq_factor"]),
                "rope_high_freq_factor": float(source["high_freq_factor"]),
                "rope_original_max_len": int(source["original_max_position_embeddings"])}
    if kind == "yarn":
        if source.get("attention_factor") is not None or source.get("truncate", True) is not True:
            raise UserError("YaRN with an explicit attention_factor or truncate=false is not supported — zili "
                            "implements YaRN as DeepSeek-V3 and Qwen3 configure it")
        return {"rope_theta": float(theta), "rope_scaling": "yarn", "rope_factor": float(source["factor"]),
                "rope_original_max_len": int(source["original_max_position_embeddings"]),
                "rope_beta_fast": float(source.get("beta_fast") or 32.0),
                "rope_beta_slow": float(source.get("beta_slow") or 1.0),
                "rope_mscale": float(source.get("mscale") or 0.0),
                "rope_mscale_all_dim": float(source.get("mscale_all_dim") or 0.0)}
    raise UserError(f"rope scaling {kind!r} is not supported — zili implements the default, 'llama3' and 'yarn' RoPE")


def _rope_config(args: ModelArgs) -> dict | None:
    """The classic `rope_scaling` dict for `args` (None without scaling)."""
    if args.rope_scaling == "llama3":
        return {"rope_type": "llama3", "factor": args.rope_factor, "low_freq_factor": args.rope_low_freq_factor,
                "high_freq_factor": args.rope_high_freq_factor,
                "original_max_position_embeddings": args.rope_original_max_len}
    if args.rope_scaling == "yarn":
        out = {"rope_type": "yarn", "factor": args.rope_factor,
               "original_max_position_embeddings": args.rope_original_max_len,
               "beta_fast": args.rope_beta_fast, "beta_slow": args.rope_beta_slow}
        out.update({k: v for k, v in (("mscale", args.rope_mscale), ("mscale_all_dim", args.rope_mscale_all_dim))
                    if v})
        return out
    return None


def _moe_fields(config: dict, family: str, n_layers: int) -> dict:
    """ModelArgs' mixture-of-experts fields from a Qwen3-MoE or DeepSeek-V3 config.json."""
    if family == "qwen3_moe":
        if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step", 1)) != 1:
            raise UserError("Qwen3-MoE configs with mlp_only_layers or decoder_sparse_step != 1 are not supported — "
                            "zili's dense blocks come first (first_k_dense_replace)")
        experts = config["num_experts"] if "num_experts" in config else config["num_local_experts"]  # transformers 5
        return dict(n_routed_experts=int(experts), top_k=int(config["num_experts_per_tok"]),
                    moe_ffn_dim=int(config["moe_intermediate_size"]), score_func="softmax",
                    norm_topk_prob=bool(config.get("norm_topk_prob", False)))
    if config.get("scoring_func", "sigmoid") != "sigmoid" or config.get("topk_method", "noaux_tc") != "noaux_tc":
        raise UserError("DeepSeek-V3 configs route with sigmoid scores and the bias (scoring_func 'sigmoid', "
                        "topk_method 'noaux_tc'); this one does not — not supported")
    return dict(n_routed_experts=int(config["n_routed_experts"]),
                n_shared_experts=int(config.get("n_shared_experts") or 0),
                top_k=int(config["num_experts_per_tok"]), moe_ffn_dim=int(config["moe_intermediate_size"]),
                n_dense_layers=min(int(config.get("first_k_dense_replace") or 0), n_layers), score_func="sigmoid",
                n_group=int(config.get("n_group") or 1), topk_group=int(config.get("topk_group") or 1),
                norm_topk_prob=bool(config.get("norm_topk_prob", True)),
                routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)))


def _mla_fields(config: dict) -> dict:
    return dict(attention="mla", q_lora_rank=int(config.get("q_lora_rank") or 0),
                kv_lora_rank=int(config["kv_lora_rank"]), qk_nope_head_dim=int(config["qk_nope_head_dim"]),
                qk_rope_head_dim=int(config["qk_rope_head_dim"]), v_head_dim=int(config["v_head_dim"]),
                rope_interleave=bool(config.get("rope_interleave", True)))


def args_from_config(config: dict) -> tuple[ModelArgs, str]:
    """(ModelArgs, family) for a Hugging Face config.json dict; UserError for what zili cannot represent."""
    family = family_of(config)
    try:
        dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        layers = int(config["num_hidden_layers"])
        fields = dict(
            n_layers=layers, dim=dim, n_heads=heads,
            n_kv_heads=int(config.get("num_key_value_heads") or heads), ffn_dim=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            qkv_bias=family == "qwen2" or bool(config.get("attention_bias", False)),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_seq_len=int(config.get("max_position_embeddings", 4096)),
            **_rope(config),
        )
        if family in ("qwen3", "qwen3_moe"):
            fields["qk_norm"] = True
            head_dim = int(config.get("head_dim") or dim // heads)
            if head_dim != dim // heads or dim % heads:
                fields["head_size"] = head_dim
        if family in ("qwen3_moe", "deepseek_v3"):
            fields.update(_moe_fields(config, family, layers))
        if family == "deepseek_v3":
            fields.update(_mla_fields(config))
    except KeyError as e:
        raise UserError(f"config.json lacks {e.args[0]!r} — "
                        f"it is not a complete {MODEL_TYPES[family]} config") from None
    args = ModelArgs(**fields)
    if family in ("qwen2", "llama") and config.get("head_dim") not in (None, args.head_dim):
        raise UserError(f"head_dim {config['head_dim']} differs from hidden_size / num_attention_heads — not supported")
    if family != "qwen2" and args.qkv_bias:
        raise UserError("attention_bias=true (a bias on o_proj as well) is not supported — zili has q/k/v bias only "
                        "(Qwen2)")
    if config.get("use_sliding_window"):
        raise UserError("sliding-window attention (use_sliding_window=true) is not supported — zili attends to the "
                        "whole context")
    if config.get("hidden_act", "silu") != "silu" or config.get("mlp_bias"):
        raise UserError("only SwiGLU MLPs with silu and no bias are supported")
    return args.validate(), family


def family_problem(args: ModelArgs, family: str) -> str | None:
    """Why `family`'s Hugging Face architecture cannot hold a model of `args` (None if it can)."""
    gqa_only = {"llama": "no q/k/v bias, no q/k norm", "qwen2": "q/k/v bias", "qwen3": "q/k norm"}
    if family in gqa_only:
        fits = (not args.is_mla and not args.is_moe and args.qkv_bias == (family == "qwen2")
                and args.qk_norm == (family == "qwen3"))
        return None if fits else f"{MODEL_TYPES[family]} is a dense grouped-query model with {gqa_only[family]}"
    if family == "qwen3_moe":
        fits = (not args.is_mla and args.qk_norm and not args.qkv_bias and args.is_moe
                and args.score_func == "softmax" and not args.n_shared_experts and not args.n_dense_layers
                and args.routed_scaling_factor == 1.0)
        return None if fits else ("Qwen3MoeForCausalLM has grouped-query attention with q/k norm and softmax-routed "
                                  "experts in every block, none shared")
    fits = args.is_mla and args.is_moe and args.score_func == "sigmoid" and args.n_shared_experts > 0
    return None if fits else ("DeepseekV3ForCausalLM has multi-head latent attention and sigmoid-routed experts "
                              "with shared experts")


def family_for(args: ModelArgs) -> str:
    """The Hugging Face family a model of `args` exports as; UserError when none can hold it."""
    for family in ("llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3"):
        if family_problem(args, family) is None:
            return family
    raise UserError("no Hugging Face architecture zili writes holds this model (attention "
                    f"{args.attention}{', q/k norm' if args.qk_norm else ''}, "
                    f"{'experts routed by ' + args.score_func if args.is_moe else 'dense'}) — export needs the shape "
                    "of Llama, Qwen2, Qwen3, Qwen3-MoE or DeepSeek-V3")


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
    if family != "qwen2":
        config.update({"attention_bias": args.qkv_bias, "mlp_bias": False})
    if family == "qwen3_moe":
        config.update({"num_experts": args.n_routed_experts, "num_experts_per_tok": args.top_k,
                       "moe_intermediate_size": args.moe_ffn_dim, "norm_topk_prob": args.norm_topk_prob,
                       "decoder_sparse_step": 1, "mlp_only_layers": []})
    if family == "deepseek_v3":
        config.update({"n_routed_experts": args.n_routed_experts, "n_shared_experts": args.n_shared_experts,
                       "num_experts_per_tok": args.top_k, "moe_intermediate_size": args.moe_ffn_dim,
                       "first_k_dense_replace": args.n_dense_layers, "n_group": args.n_group,
                       "topk_group": args.topk_group, "norm_topk_prob": args.norm_topk_prob,
                       "routed_scaling_factor": args.routed_scaling_factor, "scoring_func": "sigmoid",
                       "topk_method": "noaux_tc", "q_lora_rank": args.q_lora_rank or None,
                       "kv_lora_rank": args.kv_lora_rank, "qk_nope_head_dim": args.qk_nope_head_dim,
                       "qk_rope_head_dim": args.qk_rope_head_dim, "v_head_dim": args.v_head_dim,
                       "head_dim": args.qk_rope_head_dim, "rope_interleave": args.rope_interleave,
                       "num_nextn_predict_layers": args.mtp_depth})
    if (scaling := _rope_config(args)) is not None:
        config["rope_scaling"] = scaling
    if eos_id is not None:
        config["eos_token_id"] = eos_id
    return config
