"""The engine a benchmark runs: a named model through slerpviz.models, or a model of a known shape with random
weights (speed does not depend on the weights), for machines without the weights or tests without the time."""

from __future__ import annotations

import contextlib
import sys

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

from ..engine import MergingEngine
from ..models import load_for_command_line

SHAPES = ("tiny", "mistral-7b")


def shape_config(name: str):
    """A config of a known shape. `tiny` is for tests; `mistral-7b` is Mistral-7B-v0.2's shape: full
    attention, no sliding window (v0.1 had a 4096-token one)."""
    if name == "tiny":
        return LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        )
    if name == "mistral-7b":
        return MistralConfig(
            vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
            sliding_window=None, rope_theta=1e6,
        )
    raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")


class IdTokenizer:
    """Stands in for a tokenizer for random weights: the engine decodes ids for its trace, and a prompt built from
    text (retrieval) gets one id per character, within the vocabulary. Only the code path means anything."""

    eos_token_id = None
    bos_token_id = None
    chat_template = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, text: str, add_special_tokens: bool = True, return_tensors=None) -> dict:
        ids = [ord(c) % self.vocab_size for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(str(i) for i in ids)

    def batch_decode(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]


def random_weight_engine(shape: str, device: str = "cpu", dtype: torch.dtype | None = None, seed: int = 0
                         ) -> MergingEngine:
    """A model of `shape` with random weights built straight on `device` (no copy of 7B weights through the CPU)."""
    config = shape_config(shape)
    # Random weights generate arbitrary ids, eos among them; a benchmark must decode every step it asked for.
    config.eos_token_id = None
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return MergingEngine(model, IdTokenizer(config.vocab_size))


def named_engine(name: str, device: str = "cpu") -> MergingEngine:
    return load_for_command_line(name, device=device, progress=lambda message: print(message, file=sys.stderr))


@contextlib.contextmanager
def never_stops(engine: MergingEngine):
    """Runs inside decode every step asked for: a speed run that met an end-of-sequence token early would time
    fewer steps for one variant than the other."""
    saved = engine.eos_ids
    engine.eos_ids = set()
    try:
        yield engine
    finally:
        engine.eos_ids = saved
