"""A prompt the engine has run, and what its caches hold. slerpviz.forward's prefill makes the session, with itself
(a LayerwiseModel) as its engine and the Layout its merge left; this module imports neither, so as not to import
its importer."""

from __future__ import annotations

import torch


class Session:
    """A prompt the engine has run: its per-layer KV caches (shorter after each cutoff), the layout the merge left,
    the stages that actually ran, and the next-token logits. `decode` feeds generated tokens one step at a time."""

    def __init__(self, engine: LayerwiseModel, cache, layout: Layout, cosines: list[torch.Tensor], length: int,
                 logits: torch.Tensor):
        self.engine, self.cache, self.layout, self.cosines = engine, cache, layout, cosines
        self.length = length  # original tokens fed so far: the next one sits at this position
        self.logits = logits  # [1, vocab]: the next token's

    rows = 1  # sequences its cache holds (slerpviz.batch's sessions hold several)

    @property
    def stages(self) -> list[Stage]:
        return self.layout.stages

    def segment_rows(self, index: int) -> tuple[float, torch.Tensor | None, None]:
        """What static decoding loads for segment `index`, per row: its offset, log sizes (or None) and the slots
        that hold a token (None: all of them)."""
        segment = self.layout.segments[index]
        return segment.offset, segment.log_sizes, None

    @torch.inference_mode()
    def decode(self, token: int | torch.Tensor) -> torch.Tensor:
        """Feed one token (or [1, n] tokens) through every layer's cache; the next token's logits [1, vocab]."""
        if self.cache is None:
            raise ValueError("this session was prefilled without a cache; re-run the prompt to go on")
        ids = torch.as_tensor(token, device=self.engine.device).reshape(1, -1)
        h = self.engine.forward_new(self.engine.decoder.embed_tokens(ids), self.length, self.layout, self.cache)
        self.length += ids.shape[1]
        self.logits = self.engine.head(h)
        return self.logits

    def kv_lengths(self) -> list[int]:
        """Tokens (slots) each layer's cache holds."""
        return cache_lengths(self.cache) if self.cache is not None else []

    def kv_bytes(self) -> list[int]:
        return kv_bytes_per_layer(self.cache) if self.cache is not None else []


def cache_lengths(cache) -> list[int]:
    """Tokens (slots) each layer of a transformers cache holds."""
    return [layer.get_seq_length() for layer in cache.layers]


def kv_bytes_per_layer(cache) -> list[int]:
    sizes = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        sizes.append(sum(t.numel() * t.element_size() for t in (keys, values) if t is not None))
    return sizes
