"""Hugging Face interop: our dense transformer <-> `LlamaForCausalLM` (the key map, the
config.json, what HF's class cannot hold), and the save_pretrained files of any model
(config.yaml + model.safetensors). The commands are apps.main.export and apps.main.import_hf;
`LMTransformer.save_pretrained` / `from_pretrained` use the files here.

The rotary layout needs no permutation here. Meta Lingua's RoPE rotates adjacent pairs
(x[2i], x[2i+1]), so its export permutes the rows of wq and wk per head into HF's rotate-half
layout (x[i], x[i + head_dim/2]). Our `lingua.transformer.apply_rope` already rotates halves,
exactly as HF's `apply_rotary_pos_emb`, with the same frequencies (theta^(-2i/head_dim), the
table repeated over both halves): the weights map one to one. `metalingua_to_rotate_half` is
the permutation, for checkpoints trained with Meta Lingua's own code, and for the test that
shows what the wrong layout does to the logits.
"""

from __future__ import annotations

import re
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from lingua.transformer import BaseTransformerArgs

PRETRAINED_CONFIG, PRETRAINED_WEIGHTS = "config.yaml", "model.safetensors"  # save_pretrained's files

# ours (inside layers.{i}.) -> HF (inside model.layers.{i}.)
LAYER_MAP = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
TOP_MAP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_OURS = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")
_HF = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


class NotLlama(ValueError):
    """The model (or the HF checkpoint) has parts the other side cannot represent."""


def dense_blockers(args: BaseTransformerArgs) -> list[str]:
    """The config keys of parts LlamaForCausalLM has no place for (empty: exportable); `args`
    is a model's args (apps/main's LMTransformerArgs: the memory keys are read if present)."""
    pk = getattr(args, "productkey_args", None)
    checks = [
        (pk is not None and pk.is_enabled, "model.productkey_args.is_enabled (product-key memory layers)"),
        (args.mhc.enabled, "model.mhc.enabled (hyper-connection streams)"),
        (getattr(args, "use_internal_memory", False), "model.use_internal_memory (LM2 memory slots)"),
        (getattr(args, "use_external_memory", False), "model.use_external_memory (the memory bank)"),
        (getattr(args, "segment_length", 0) > 0,
         f"model.segment_length={getattr(args, 'segment_length', 0)} (segment-wise attention)"),
        (getattr(args, "sliding_window", None) is not None,
         f"model.sliding_window={getattr(args, 'sliding_window', None)} (Llama attends to the whole context)"),
    ]
    return [key for blocked, key in checks if blocked]


def check_dense(args: BaseTransformerArgs) -> None:
    blockers = dense_blockers(args)
    if blockers:
        raise NotLlama("LlamaForCausalLM cannot hold this model: " + "; ".join(blockers)
                       + ". Save it with format=pretrained (LMTransformer.save_pretrained) instead")


def metalingua_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from the adjacent-pair rotary layout to rotate-half, per head."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def to_hf_state_dict(state: dict[str, torch.Tensor], args: BaseTransformerArgs) -> dict[str, torch.Tensor]:
    """Our full state dict -> LlamaForCausalLM's; a tied output is left out (HF ties it)."""
    out = {}
    for key, value in state.items():
        if key == "output.weight" and args.weight_tying:
            continue
        match = _OURS.match(key)
        if match and match.group(2) in LAYER_MAP:
            out[f"model.layers.{match.group(1)}.{LAYER_MAP[match.group(2)]}.weight"] = value
        elif key.removesuffix(".weight") in TOP_MAP and key.endswith(".weight"):
            out[TOP_MAP[key.removesuffix(".weight")] + ".weight"] = value
        else:
            raise NotLlama(f"parameter '{key}' has no place in LlamaForCausalLM")
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor], args: BaseTransformerArgs) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's state dict -> ours (rotary buffers dropped; a tied output filled)."""
    layer_back = {v: k for k, v in LAYER_MAP.items()}
    top_back = {v: k for k, v in TOP_MAP.items()}
    out = {}
    for key, value in state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # a buffer older exports carry; ours is recomputed from rope_theta
        match = _HF.match(key)
        if match and match.group(2) in layer_back:
            out[f"layers.{match.group(1)}.{layer_back[match.group(2)]}.weight"] = value
        elif key.endswith(".weight") and key.removesuffix(".weight") in top_back:
            out[top_back[key.removesuffix(".weight")] + ".weight"] = value
        else:
            raise NotLlama(f"HF parameter '{key}' has no place in our model (biases or another architecture?)")
    if args.weight_tying:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def hf_config(args: BaseTransformerArgs, bos_id: int, eos_id: int, dtype: torch.dtype, tokenizer: dict) -> dict:
    """config.json of the LlamaForCausalLM that holds a model of these args. `tokenizer` (our
    data.tokenizer section) rides along as `lingua_tokenizer`, for import_hf."""
    n_heads, n_kv_heads, head_dim = args.resolved_heads()
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": args.vocab_size, "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim(),
        "num_hidden_layers": args.n_layers, "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim, "hidden_act": "silu", "max_position_embeddings": args.max_seqlen,
        "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,  # transformers 4 reads this one
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},  # and 5 this one
        "rope_scaling": None, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": args.weight_tying,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": str(dtype).removeprefix("torch."),
        "lingua_tokenizer": tokenizer,
    }


def llama_model_keys(config: dict[str, Any]) -> dict[str, Any]:
    """Our model keys (the `model` section) for an HF Llama config.json; NotLlama naming the
    key we cannot follow."""
    if config.get("model_type") != "llama":
        raise NotLlama(f"config.json: model_type={config.get('model_type')!r}, only 'llama' is supported")
    rope = config.get("rope_parameters") or {}
    if config.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise NotLlama(f"config.json: rope scaling {config.get('rope_scaling') or rope} is not supported "
                       "(our RoPE is the plain one)")
    for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if config.get(key, ok) != ok:
            raise NotLlama(f"config.json: {key}={config[key]!r} is not supported (ours: {ok!r})")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or dim // n_heads
    if head_dim * n_heads != dim:
        raise NotLlama(f"config.json: head_dim={head_dim} x num_attention_heads={n_heads} != hidden_size={dim}")
    hidden, default_hidden = config["intermediate_size"], int(8 * dim / 3)
    # ffn_hidden_dim() rounds int(8 dim / 3) (times ffn_dim_multiplier) up to multiple_of:
    # multiple_of = the intermediate size itself gives it back exactly.
    ffn = {"multiple_of": hidden, "ffn_dim_multiplier": None if hidden >= default_hidden else hidden / default_hidden}
    got = BaseTransformerArgs(dim=dim, n_heads=n_heads, **ffn).ffn_hidden_dim()
    if got != hidden:
        raise NotLlama(f"config.json: intermediate_size={hidden} cannot be expressed (got {got})")
    return {
        "dim": dim, "n_layers": config["num_hidden_layers"], "n_heads": n_heads,
        "n_kv_heads": config.get("num_key_value_heads") or n_heads, "norm_eps": config.get("rms_norm_eps", 1e-6),
        "rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        "max_seqlen": config.get("max_position_embeddings", 2048), "vocab_size": config["vocab_size"],
        "weight_tying": bool(config.get("tie_word_embeddings", False)), **ffn,
    }


def save_pretrained_files(directory: str | os.PathLike, model_keys: dict, state: dict[str, torch.Tensor],
                          tied: bool = False) -> Path:
    """config.yaml (model_keys) + model.safetensors (state; a tied output.weight left out, it
    is the embedding) in a new or empty directory, each written complete before it is in place."""
    from safetensors.torch import save_file

    out = Path(directory)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"'{out}' exists and is not an empty directory: not overwriting it")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items() if not (tied and k == "output.weight")}
    (out / (PRETRAINED_CONFIG + ".tmp")).write_text(yaml.safe_dump(model_keys, sort_keys=False))
    save_file(state, str(out / (PRETRAINED_WEIGHTS + ".tmp")), metadata={"format": "pt"})
    for name in (PRETRAINED_CONFIG, PRETRAINED_WEIGHTS):
        os.replace(out / (name + ".tmp"), out / name)
    return out


def load_pretrained_files(directory: str | os.PathLike, device: str = "cpu") -> tuple[dict, dict[str, torch.Tensor]]:
    """(model keys, state dict) that save_pretrained_files wrote."""
    from safetensors.torch import load_file

    src = Path(directory)
    for name in (PRETRAINED_CONFIG, PRETRAINED_WEIGHTS):
        if not (src / name).exists():
            raise FileNotFoundError(f"'{src / name}' not found: not a directory written by save_pretrained")
    return yaml.safe_load((src / PRETRAINED_CONFIG).read_text()), load_file(str(src / PRETRAINED_WEIGHTS), device=device)


def args_summary(model_keys: dict) -> str:
    """The model keys a training config needs to start from an imported checkpoint, as CLI."""
    return " ".join(f"model.{k}={v}" for k, v in model_keys.items() if v is not None)
