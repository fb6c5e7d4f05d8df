"""Merging on any supported transformers model, under its own forward: `generate`, pipelines, evaluation harnesses.

    with slerpviz.merging(model, MergeSettings(cutoffs=(15,))):
        model.generate(**inputs)

The patch puts the engine's merging forward (engine.MergingForward) in place of the decoder's forward and takes it
off again, as ToMe's and tomesd's patches and kvpress's presses do; the model's weights are never touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .engine import MergeSettings, MergingEngine, MergingForward


def apply(model, settings: MergeSettings) -> MergingForward:
    """Make `model` (a Mistral, Llama or Qwen2 causal LM) merge in its own forward until `remove(model)`."""
    decoder = model.model
    if isinstance(decoder.__dict__.get("forward"), MergingForward):
        raise ValueError("this model is already merging: remove the patch (or leave its `with` block) first")
    forward = MergingForward(MergingEngine(model, tokenizer=None), settings)
    # A forward already set on the instance (accelerate's hooks put one there) comes back on remove.
    forward.previous = decoder.__dict__.get("forward")
    decoder.forward = forward
    return forward


def remove(model) -> None:
    """Give `model` its own forward back; a model without the patch is left as it is."""
    decoder = model.model
    forward = decoder.__dict__.get("forward")
    if not isinstance(forward, MergingForward):
        return
    if forward.previous is not None:
        decoder.forward = forward.previous
    else:
        del decoder.forward


@contextlib.contextmanager
def merging(model, settings: MergeSettings) -> Iterator:
    """`with merging(model, settings): ...` merges inside the block and always restores the model, on errors too."""
    apply(model, settings)
    try:
        yield model
    finally:
        remove(model)
