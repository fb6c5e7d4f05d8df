"""How the engine calls a decoder layer: the masks it takes and the call itself, eager or compiled.

The prefill may run every layer through one `torch.compile`d call (`LayerwiseModel.compile_prefill`): handed its own
layer of the cache (`OneLayerCache`), a layer reads nothing that differs from the next layer's, so one graph serves
them all, whatever the prompt's length or the merged length. The merges between them compile too, a graph per cutoff
and setting (COMPILE_CONFIG).
"""

from __future__ import annotations

import contextlib

import torch


# What the compiled prefill asks of dynamo: the merge's count of slots (a scalar read, a nonzero) traced inside its
# graph rather than breaking it, and room for a graph per cutoff of every setting in use (8 per function by default,
# past which it would run uncompiled).
COMPILE_CONFIG = dict(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True, recompile_limit=64)


def compiling(compiled: bool):
    """COMPILE_CONFIG while a compiled prefill runs (a compiled function compiles, when it does, on a call)."""
    return torch._dynamo.config.patch(**COMPILE_CONFIG) if compiled else contextlib.nullcontext()


def call_layer(layer, h: torch.Tensor, mask, cache, position_embeddings) -> torch.Tensor:
    """One decoder layer on h [1, L, d]: what the prefill compiles (`LayerwiseModel.compile_prefill`)."""
    return layer(h, attention_mask=mask, position_ids=None, cache=cache, use_cache=cache is not None,
                 position_embeddings=position_embeddings)


def cache_layer(cache, index: int):
    """Layer `index` of a transformers cache, made first where the cache was built without a config (as
    `DynamicCache.update` makes it)."""
    if getattr(cache, "offloading", False):
        # Its update moves layers between devices around the write: a one-layer view would skip that.
        raise ValueError("the compiled prefill writes each layer's cache itself: use a cache without offloading")
    while len(cache.layers) <= index and getattr(cache, "layer_class_to_replicate", None) is not None:
        cache.layers.append(cache.layer_class_to_replicate())
    return cache.layers[index]


class OneLayerCache:
    """One layer of a cache, as that layer's attention sees it: `update` writes this layer whatever index it is
    given. Compiled, a layer that picked its slot of the whole cache by its own `layer_idx` would make torch.compile
    guard on that index, one graph per layer; here the index is never read, so every layer shares one graph."""

    __slots__ = ("layer",)

    def __init__(self, layer):
        self.layer = layer

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.layer.update(keys, values, *args, **kwargs)


def add_key_bias(mask: torch.Tensor, log_sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive float mask [.., q, kv] from a bool or float causal mask, plus log(size) of each key: log_sizes
    [slots], or [batch, slots] with a row per sequence of a batch.

    Keys past the merged slots (tokens fed after the prefill) hold one token each: bias 0.
    """
    kv = mask.shape[-1]
    bias = torch.zeros(*log_sizes.shape[:-1], kv, dtype=torch.float32, device=mask.device)
    bias[..., : log_sizes.shape[-1]] = log_sizes.to(mask.device)
    if bias.ndim == 2:  # [batch, kv] against a mask [batch, heads, q, kv]
        bias = bias[:, None, None, :]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask + bias.to(dtype)


def is_sliding(config, layer: int) -> bool:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[layer] == "sliding_attention"
    return getattr(config, "sliding_window", None) is not None
