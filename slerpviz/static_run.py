"""The patch under a transformers StaticCache (slerpviz.patch): a prompt merged into slerpviz's own cache, and how
its new tokens run, through slerpviz.decode's static decoder (a CUDA graph on a GPU) or, where that cannot run it
exactly, the dynamic path; a batch's rows together (slerpviz.batch)."""

from __future__ import annotations

import weakref

import torch
from transformers import StaticCache

from . import batch as batches
from .session import Session


def static_capacity(cache: StaticCache) -> int | None:
    """The tokens a StaticCache was made for (its max_cache_len), or None when no layer can say: a sliding-window
    layer keeps min(window, max_cache_len) and says which only when the window is the longer."""
    full = [layer.max_cache_len for layer in cache.layers if not getattr(layer, "is_sliding", False)]
    if full:
        return max(full)
    bounded = [layer.max_cache_len for layer in cache.layers if getattr(layer, "_is_croppable", False)]
    return max(bounded) if bounded else None


class StaticRun:
    """A prompt merged under a StaticCache, and how its new tokens run: slerpviz's static decoder, or the dynamic
    path on the session's own cache when the decoder cannot run it exactly (decode.unsupported)."""

    def __init__(self, session: Session, decoder, cache: StaticCache, capacity: int | None, position: int):
        # position: tokens fed so far, a batch's padding included
        self.session, self.decoder, self.position = session, decoder, position
        self.capacity = capacity  # the tokens the StaticCache was made for (the decoder's buffers round up past it)
        if decoder is not None:
            session.cache = None  # the decoder's buffers hold copies; the dynamic cache would only take memory
        # The decoder goes back to its engine's pool when the StaticCache goes, or when it starts a new prompt.
        self._release = weakref.finalize(cache, decoder.release) if decoder is not None else None

    def step(self, input_ids, inputs_embeds) -> torch.Tensor:
        """One token a row (its ids [B, 1], or its embeddings [B, 1, d]): the final norm's output [B, 1, d]."""
        session = self.session
        if self.capacity is not None and self.position >= self.capacity:
            raise ValueError(f"the static cache was made for {self.capacity} tokens, and this would be token "
                             f"{self.position + 1}: give it a max_cache_len of the prompt plus the new tokens")
        if self.decoder is None:
            engine = session.engine
            h = engine.embedded(input_ids, inputs_embeds)
            if session.rows == 1:
                h = engine.forward_new(h, self.position, session.layout, session.cache)
            else:
                h = batches.forward_new(engine, h, self.position, session.layout, session.cache)
            out = engine.decoder.norm(h)
        elif input_ids is None:
            raise ValueError("under merging, static decoding feeds token ids after the prompt, not inputs_embeds")
        else:
            out = self.decoder.step(input_ids)
        self.position += 1
        return out

    def close(self) -> None:
        if self._release is not None:
            self._release()  # a finalizer runs once: never again when the cache goes
