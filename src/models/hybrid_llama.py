"""The seed's hybrid model names on apps.main.transformer:

    from src.models.hybrid_llama import HybridLlamaConfig, HybridLlama
    model = HybridLlama(HybridLlamaConfig(vocab_size=32000, hidden_size=512, num_hidden_layers=4))

HybridLlamaConfig is LMTransformerArgs with the shipped hybrid's model section
(apps/main/configs/llama_hybrid.yaml) as its defaults and Llama's Hugging Face names accepted
beside ours; HybridLlama is LMTransformer (initialised from config.seed).
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

import torch
import yaml

from apps.main.transformer import LMTransformer, LMTransformerArgs
from lingua.transformer import ParamInit

HF_NAMES = {
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "max_position_embeddings": "max_seqlen",
    "rms_norm_eps": "norm_eps",
    "tie_word_embeddings": "weight_tying",
    "bos_token_id": "bos_id",
}
SHIPPED = Path(__file__).resolve().parents[2] / "apps" / "main" / "configs" / "llama_hybrid.yaml"


class HybridLlamaConfig(LMTransformerArgs):
    def __init__(self, **kwargs):
        names = {f.name for f in dataclasses.fields(LMTransformerArgs)}
        values = {"bos_id": 1, **yaml.safe_load(SHIPPED.read_text())["model"]}  # Llama's BOS is 1
        for key, value in kwargs.items():
            ours = HF_NAMES.get(key, key)
            if ours not in names:
                close = difflib.get_close_matches(key, sorted(names | set(HF_NAMES)), n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise TypeError(f"HybridLlamaConfig: unknown argument {key!r}{hint}")
            values[ours] = value
        super().__init__(**values)
        self.check_memory()


class HybridLlama(LMTransformer):
    """LMTransformer, initialised on construction like the seed's model (apps.main builds on
    the meta device and initialises after sharding instead)."""

    def __init__(self, config: LMTransformerArgs, device: torch.device | str = "cpu"):
        with torch.device(device):
            super().__init__(config)
        if torch.device(device).type != "meta":
            self.reset_parameters(ParamInit(config.seed))
