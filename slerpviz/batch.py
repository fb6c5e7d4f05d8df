"""A batch under the patch: each prompt merged on its own, then every new token run for the whole batch at once.

The pairs, the positions and the cache lengths are planned per sequence, so the prompts of a batch are merged one by
one (each exactly as it would be alone, through the one merging forward) and their caches stacked, layer by layer:
each row is padded on the left to the longest at that layer, as transformers pads a batch for generation. A 2-D mask
per segment of layers hides that padding from every new token, and each row's new tokens sit at the positions they
would have alone. Prompts may come padded on the left (tokenizer.padding_side = "left"); the padding is taken off
before a prompt is merged. The merging forward (slerpviz.patch) calls this for a batch, or for a padded prompt; under
a static cache the stacked cache goes to slerpviz.decode's static decoder (`BatchSession`), whose buffers take a row
each and hide the same padded slots.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .forward import Layout
from .layers import is_sliding


@dataclass(frozen=True)
class BatchLayout:
    """What new tokens of a batch need: per row its layout (for the trace) and left padding of the prompt, and per
    segment of layers the slots each row holds and where each row's new tokens sit there."""

    layouts: list[Layout]
    pads: torch.Tensor  # [batch] long: padding before each prompt, in the tokens the caller fed
    prompt_length: int  # tokens fed with the prompts, padding included
    slots: list[torch.Tensor]  # per segment: [batch, cache length] bool, False where a row's merged cache is padded
    offsets: list[torch.Tensor]  # per segment: [batch] float, a new token's position there minus its original one
    log_sizes: list[torch.Tensor | None]  # per segment: [batch, cache length] log(tokens per slot), or None

    @property
    def segments(self):
        """The segments of layers (as every row's), each with the batch's log sizes [B, slots] (or None)."""
        return [dataclasses.replace(segment, log_sizes=sizes)
                for segment, sizes in zip(self.layouts[0].segments, self.log_sizes)]


def is_2d(attention_mask) -> bool:
    """A [batch, tokens] mask of 1s and 0s; generate gives a static cache 4-D masks (a dict of them per layer kind)."""
    return isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2


def padded(attention_mask) -> bool:
    """A 2-D mask with a 0 in it: padding (before a prompt, or elsewhere, which `left_padding` refuses)."""
    return is_2d(attention_mask) and not bool(attention_mask.all())


def left_padding(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """Padding before each prompt [batch], from a 2-D mask of 1s and 0s (none: no padding). Padding anywhere but
    on the left is refused: a new token must follow its prompt's last token."""
    if not is_2d(attention_mask):
        return torch.zeros(batch, dtype=torch.long, device=device)
    mask = attention_mask.to(device=device, dtype=torch.bool)
    pads = length - mask.sum(-1)
    if bool((pads >= length).any()):
        raise ValueError("a prompt of the batch is all padding: give every row at least one token")
    if not torch.equal(mask, torch.arange(length, device=device)[None] >= pads[:, None]):
        raise ValueError("slerpviz's merging forward takes padding on the left only, as generation wants it: set "
                         "tokenizer.padding_side = 'left' (a new token must follow its prompt's last token)")
    return pads


def merge_prompts(forward, h: torch.Tensor, cache, pads: torch.Tensor, position_ids=None
                  ) -> tuple[torch.Tensor, BatchLayout | None]:
    """Each prompt of h [B, L, d] (after `pads` tokens of padding each: `left_padding`) through the merging forward on
    its own, one row per token fed (zeros for padding, before the final norm), and its cache stacked into `cache`
    (when there is one). `forward` is the patch's MergingForward, which checks each prompt and the rows its caller
    reads."""
    engine = forward.engine
    length = h.shape[1]
    check_positions(position_ids, pads, 0, length)
    out = torch.zeros_like(h)
    layouts, caches = [], []
    for row, pad in enumerate(pads.tolist()):
        own = DynamicCache(config=engine.config) if cache is not None else None
        hidden, layout, _ = forward._merged_prompt(h[row:row + 1, pad:], own, pad=pad)
        out[row, pad:] = hidden[0]
        layouts.append(layout)
        caches.append(own)
    if cache is None:
        return out, None
    _check_windows(caches)
    slots, offsets, log_sizes = [], [], []
    for number, segment in enumerate(layouts[0].segments):
        held = [own.layers[segment.start].get_seq_length() for own in caches]
        # Generate counts the tokens it fed by the first layer's length: there, the padding fed is kept.
        longest = max(held + ([length] if segment.start == 0 else []))
        for index in range(segment.start, segment.end):
            layers = [own.layers[index] for own in caches]
            cache.update(torch.cat([_left_padded_to(layer.keys, longest) for layer in layers]),
                         torch.cat([_left_padded_to(layer.values, longest) for layer in layers]), index)
        start = torch.tensor([longest - count for count in held], device=h.device)
        slots.append(torch.arange(longest, device=h.device)[None] >= start[:, None])
        offsets.append(torch.tensor([float(layout.segments[number].offset) for layout in layouts], device=h.device))
        sizes = [layout.segments[number].log_sizes for layout in layouts]
        log_sizes.append(None if all(size is None for size in sizes) else torch.stack([
            F.pad(torch.zeros(count, device=h.device) if size is None else size.to(h.device).float(),
                  (longest - count, 0)) for size, count in zip(sizes, held)]))
    return out, BatchLayout(layouts, pads, length, slots, offsets, log_sizes)


class BatchSession:
    """A batch's merged prompts as slerpviz.decode's static decoder loads them (the patch, under a static cache): the
    stacked cache, each row's length, and per segment each row's offset, log sizes and slots."""

    def __init__(self, engine, cache, layout: BatchLayout):
        self.engine, self.cache, self.layout = engine, cache, layout
        self.rows = len(layout.layouts)
        self.length = layout.prompt_length - layout.pads  # [B]: each row's own tokens

    def segment_rows(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        return self.layout.offsets[index], self.layout.log_sizes[index], self.layout.slots[index]


def static_session(forward, h: torch.Tensor, cache, attention_mask, position_ids
                   ) -> tuple[torch.Tensor, BatchSession]:
    """A batch's prompts, given with a StaticCache, merged into `cache` (slerpviz's own, which the static decoder
    loads): the rows fed (before the final norm) and the session. Generate hands a static cache 4-D masks, a dict of
    them per kind of layer: the prompt's last token sees every key of its row but the padding."""
    engine = forward.engine
    if any(is_sliding(engine.config, index) for index in range(engine.num_layers)):
        raise ValueError("a batch under a static cache needs full-attention layers (a sliding window's mask would "
                         "read as padding): generate the batch with the dynamic cache")
    mask = attention_mask.get("full_attention") if isinstance(attention_mask, dict) else attention_mask
    length = h.shape[1]
    if isinstance(mask, torch.Tensor) and mask.ndim == 4:
        seen = mask[:, 0, -1, :length]
        mask = seen if seen.dtype == torch.bool else seen == 0
    hidden, layout = merge_prompts(forward, h, cache, left_padding(mask, h.shape[0], length, h.device), position_ids)
    return hidden, BatchSession(engine, cache, layout)


def continues(position_ids, session: BatchSession, start: int) -> bool:
    """Whether one token a row fed after `start` tokens continues the batch (the caller's positions, where given,
    are each row's own count); one read of the device."""
    return _agree(position_ids, _row_positions(session.layout.pads, start, 1), start)


def forward_new(engine, h: torch.Tensor, start: int, layout: BatchLayout, cache, position_ids=None,
                attention_mask=None) -> torch.Tensor:
    """New tokens h [B, n, d] of every row, the first fed after `start` tokens (padding included), through every
    layer's cache; in each row they sit where they would alone. `position_ids`, the caller's, must say the same, and
    its 2-D mask may hide nothing after the prompts (read only for several tokens: generate feeds one, unpadded)."""
    batch, new = h.shape[:2]
    fed = start - layout.prompt_length  # tokens fed after the prompts, before these
    if new > 1 and is_2d(attention_mask) and not bool(attention_mask[:, layout.prompt_length:].all()):
        raise ValueError("under merging a batch is padded before its prompts only: tokens fed after them (a new "
                         "turn of different lengths, say) cannot be padded; continue each sequence on its own")
    real = check_positions(position_ids, layout.pads, start, new)
    for number, segment in enumerate(layout.segments):
        seen = torch.cat([layout.slots[number], layout.slots[number].new_ones(batch, fed + new)], dim=1)
        positions = real.float() + layout.offsets[number][:, None]
        h = engine._run_layers(h, segment.start, segment.end, positions, cache, layout.log_sizes[number],
                               attention_mask=seen)
    return h


def check_positions(position_ids, pads: torch.Tensor, start: int, new: int) -> torch.Tensor:
    """Each row's original positions [B, n] of `new` tokens fed after `start` (padding included); the caller's
    `position_ids`, where given, must agree on every token that is not padding."""
    real = _row_positions(pads, start, new)
    if not _agree(position_ids, real, start):
        raise ValueError("slerpviz's merging forward places the tokens itself (merged slots get their own "
                         "positions): position_ids other than each row's running count are not supported")
    return real


def _row_positions(pads: torch.Tensor, start: int, new: int) -> torch.Tensor:
    return (start - pads)[:, None] + torch.arange(new, device=pads.device)


def _agree(position_ids, real: torch.Tensor, start: int) -> bool:
    """Whether the caller's position ids (None: it says nothing) are `real` wherever a token is not padding."""
    if position_ids is None:
        return True
    said = position_ids.to(real.device).expand(*real.shape)
    # After the prompt no row has padding left to skip: one read of the device, not three (boolean indexing).
    return torch.equal(said, real) if start > 0 else torch.equal(said[real >= 0], real[real >= 0])


def _left_padded_to(states: torch.Tensor, length: int) -> torch.Tensor:
    """A row's keys or values [1, heads, n, head dim], padded on the left to `length` slots."""
    return F.pad(states, (0, 0, length - states.shape[-2], 0))


def _check_windows(caches: list[DynamicCache]) -> None:
    """Refuse a batch whose sliding-window layer already dropped keys of a prompt: stacked, its rows would disagree
    on how many keys came before the window."""
    for own in caches:
        for layer in own.layers:
            if getattr(layer, "is_sliding", False) and layer.get_seq_length() != layer.keys.shape[-2]:
                raise ValueError("a batch under merging is not supported once a prompt outgrows a sliding-window "
                                 "layer's window: merge such prompts one at a time")
