"""Merging on any supported transformers model, under its own forward: `generate`, pipelines, evaluation harnesses.

    with slerpviz.merging(model, MergeSettings(cutoffs=(15,))):
        model.generate(**inputs)

The patch puts the engine's merging forward (engine.MergingForward) in place of the decoder's forward and takes it
off again, as ToMe's and tomesd's patches and kvpress's presses do; the model's weights are never touched.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator

from .engine import MergeSettings, MergingEngine, MergingForward


def apply(model, settings: MergeSettings) -> MergingForward:
    """Make `model` (a Mistral, Llama or Qwen2 causal LM) merge in its own forward until `remove(model)`."""
    decoder = model.model
    if isinstance(decoder.__dict__.get("forward"), MergingForward):
        raise ValueError("this model is already merging: remove the patch (or leave its `with` block) first")
    was_training = model.training  # the engine puts the model in eval mode; remove() gives the mode back
    forward = MergingForward(MergingEngine(model, tokenizer=None), settings)
    forward.was_training = was_training
    # A forward already set on the instance (accelerate's hooks put one there) comes back on remove.
    forward.previous = decoder.__dict__.get("forward")
    decoder.forward = forward
    forward.previous_generate = model.__dict__.get("generate")
    model.generate = _refusing_draft_tokens(model.generate)
    forward.previous_model_forward = model.__dict__.get("forward")
    model.forward = _telling_rows(model.forward, forward)
    return forward


def _telling_rows(model_forward, merging: MergingForward):
    """The model's forward, telling the merging decoder which rows its caller reads (logits_to_keep): under merging
    only rows that depend on no later token are honest, and the decoder refuses a call that would read another."""
    signature = inspect.signature(model_forward)
    parameter = signature.parameters.get("logits_to_keep")
    default = parameter.default if parameter is not None and parameter.default is not parameter.empty else 0

    @functools.wraps(model_forward)
    def merging_forward(*args, **kwargs):
        try:
            rows = signature.bind_partial(*args, **kwargs).arguments.get("logits_to_keep", default)
        except TypeError:  # the model's own forward will say what is wrong with the arguments
            rows = default
        with merging.reading(rows):
            return model_forward(*args, **kwargs)

    return merging_forward


# Generation modes that feed draft tokens with the prompt and crop the cache back to those accepted: the drafts would
# be merged into the prompt and the merged cache's own count of tokens would run ahead of it.
DRAFTING = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp")


def _refusing_draft_tokens(generate):
    @functools.wraps(generate)
    def merging_generate(*args, **kwargs):
        config = kwargs.get("generation_config") or getattr(generate.__self__, "generation_config", None)
        asked = [name for name in DRAFTING if kwargs.get(name, getattr(config, name, None)) not in (None, False)]
        if asked:
            raise ValueError(f"assisted and prompt-lookup generation ({', '.join(asked)}) are not supported while "
                             "merging: their draft tokens would be merged into the prompt")
        return generate(*args, **kwargs)

    return merging_generate


def remove(model) -> None:
    """Give `model` its own forward back; a model without the patch is left as it is."""
    decoder = model.model
    forward = decoder.__dict__.get("forward")
    if not isinstance(forward, MergingForward):
        return
    _restore(decoder, "forward", forward.previous)
    _restore(model, "generate", forward.previous_generate)
    _restore(model, "forward", forward.previous_model_forward)
    model.train(forward.was_training)


def _restore(owner, name: str, previous) -> None:
    """Put back the instance attribute the patch replaced, or drop the patch's so the class's shows again."""
    if previous is not None:
        setattr(owner, name, previous)
    else:
        owner.__dict__.pop(name, None)


@contextlib.contextmanager
def merging(model, settings: MergeSettings) -> Iterator:
    """`with merging(model, settings): ...` merges inside the block and always restores the model, on errors too."""
    apply(model, settings)
    try:
        yield model
    finally:
        remove(model)
