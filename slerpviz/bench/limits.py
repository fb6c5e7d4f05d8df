"""What merging can save at best, from the model's config alone: the limits measured ratios are judged against.

Counts are of multiply-adds times two (FLOPs) and of bytes, for the decoder layers as a Llama / Mistral / Qwen2
layer computes them: q, k, v, o projections, a gated MLP (gate, up, down), and causal attention over the
sequence the layer sees. Norms, RoPE, softmax and the merge itself are left out: they are elementwise and small,
and the merge is timed on its own instead. The lm_head runs on the last position only, in base and merged alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..pairs import layer_lengths  # noqa: F401  (re-exported: the limits are computed from it)


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder that decide its cost."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    sliding_window: int | None = None
    bytes_per_value: int = 4

    @classmethod
    def from_config(cls, config, dtype: torch.dtype = torch.float32) -> "Shape":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            vocab=config.vocab_size,
            sliding_window=_sliding_window(config),
            bytes_per_value=torch.empty((), dtype=dtype).element_size(),
        )

    @property
    def layer_weights(self) -> int:
        """Weights one token multiplies through in one layer: attention projections plus the gated MLP."""
        q_and_o = 2 * self.hidden * self.heads * self.head_dim
        k_and_v = 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = 3 * self.hidden * self.intermediate
        return q_and_o + k_and_v + mlp


def _sliding_window(config) -> int | None:
    """The attention window when every layer slides; None when attention is full (a mix counts as full: an upper
    bound on cost, which keeps the limit conservative)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types and any(t != "sliding_attention" for t in layer_types)):
        return None
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2 carries a window it does not use
        return None
    return int(window)


def attention_pairs(length: int, window: int | None = None) -> int:
    """(query, key) pairs causal attention scores over a sequence: L(L+1)/2, fewer with a sliding window."""
    if window is None or window >= length:
        return length * (length + 1) // 2
    return window * (window + 1) // 2 + (length - window) * window


def layer_prefill_flops(shape: Shape, length: int) -> int:
    """One layer over `length` positions: linear layers grow with L, attention (QKᵀ and AV) with L²/2."""
    linear = 2 * length * shape.layer_weights
    attention = 2 * 2 * shape.heads * shape.head_dim * attention_pairs(length, shape.sliding_window)
    return linear + attention


def prefill_flops(shape: Shape, lengths: list[int]) -> int:
    """A whole prefill given each layer's sequence length; the lm_head scores the last position only."""
    return sum(layer_prefill_flops(shape, length) for length in lengths) + 2 * shape.hidden * shape.vocab


def prefill_speedup_limit(shape: Shape, base_lengths: list[int], merged_lengths: list[int]) -> float:
    """Base prefill FLOPs ÷ merged prefill FLOPs: the time-to-first-token speed-up if time followed FLOPs."""
    return prefill_flops(shape, base_lengths) / prefill_flops(shape, merged_lengths)


def recompute_decode_speedup_limit(shape: Shape, steps: list[tuple[list[int], list[int]]]) -> float:
    """Without a cache every new token is a prefill of the grown sequence, re-merged: the FLOP ratio summed over
    the decode steps, each given as (base layer lengths, merged layer lengths)."""
    base = sum(prefill_flops(shape, b) for b, _ in steps)
    merged = sum(prefill_flops(shape, m) for _, m in steps)
    return base / merged


def kv_bytes(shape: Shape, lengths: list[int]) -> int:
    """Bytes of keys and values a cache holds when each layer has cached `lengths[layer]` positions."""
    return 2 * shape.kv_heads * shape.head_dim * shape.bytes_per_value * sum(lengths)


def kv_fraction_limit(base_lengths: list[int], merged_lengths: list[int]) -> float:
    """Merged KV-cache size ÷ base KV-cache size after the prefill: the sum of per-layer cache lengths."""
    return sum(merged_lengths) / sum(base_lengths)


def decode_step_bytes(shape: Shape, cache_lengths: list[int]) -> int:
    """Bytes one cached decode step must read: every layer's weights, the lm_head, and the whole KV cache.

    A cached decode step multiplies one token through the weights, so it is bound by memory traffic, not FLOPs;
    this is the count its time should follow.
    """
    weights = (shape.layers * shape.layer_weights + shape.vocab * shape.hidden) * shape.bytes_per_value
    return weights + kv_bytes(shape, cache_lengths)


def cached_decode_speedup_limit(shape: Shape, base_lengths: list[int], merged_lengths: list[int],
                                new_tokens: int) -> float:
    """Base ÷ merged bytes read over the cached decode steps after the first token: step k attends over the
    prefill's cache plus k tokens. Merging shrinks only the KV part, so this limit is near 1 unless the cache
    outweighs the weights."""
    steps = range(1, max(new_tokens, 2))
    base = sum(decode_step_bytes(shape, [n + k for n in base_lengths]) for k in steps)
    merged = sum(decode_step_bytes(shape, [n + k for n in merged_lengths]) for k in steps)
    return base / merged


def variant_limits(shape: Shape, num_layers: int, length: int, merged: list[int], mode: str, new_tokens: int
                   ) -> dict:
    """The ratios the config allows for one merged variant against base, in one mode, for the layer lengths the
    merged prefill ran on (`merged`, from its own plan on these very prompts: the attention and similar choices
    decide from the hidden states, and a kept budget can merge fewer pairs than the ratio asks).

    These are FLOP and byte counts, not a ceiling on time: a measured ratio above its limit means the cost model
    underprices what the merge saves (on a CPU, attention costs more than its FLOPs), below it the merge's own cost
    or launch overhead eats into the saving."""
    base = [length] * num_layers
    if mode == "cached":
        decode = cached_decode_speedup_limit(shape, base, merged, new_tokens)
        kv = kv_fraction_limit(base, merged)
    else:
        # Each step re-runs the prompt grown by one token; the grown prompt is taken to merge as the prompt did, its
        # new tokens kept whole (they sit in the protected end), so the limit does not re-plan from other prompts.
        grown = range(1, max(new_tokens, 2))
        decode = recompute_decode_speedup_limit(
            shape, [([length + k] * num_layers, [n + k for n in merged]) for k in grown])
        kv = None  # no cache in this pair
    return {"merged_length": merged[-1], "ttft": prefill_speedup_limit(shape, base, merged),
            "decode": decode, "kv": kv}
