"""One static decode step (slerpviz.decode's): the structure a decoder is built for, its buffers on the device, and
the step itself, plain or compiled once per process.

A step reads one device counter `t` (tokens fed since the load): each segment's new token sits at RoPE position
(prompt length + t) + the segment's offset, each layer writes its new key at (its prefill length + t), and a key of a
layer is visible iff its index is at most that write index (and, on a sliding-window layer, within the window before
it); proportional attention's log(tokens per slot) rides on the visible merged keys as an additive bias. All of it is
arithmetic on tensors made at build time, so a step creates no tensor on the host, copies nothing to the device and
reads nothing back.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

BUCKET = 256  # buffer capacities are rounded up to a multiple of this, so different prompts share a compiled graph


# ---------------------------------------------------------------------------------------------------------------
# The structure of a decoder: what its compiled graph depends on
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupShape:
    """Layers of one segment with one attention type: their sliding window (0: full) and their buffers' capacity."""

    layers: tuple[int, ...]
    window: int
    capacity: int


@dataclass(frozen=True)
class SegmentShape:
    """Layers [start, end) on one sequence; `biased`: proportional attention's log(size) on its merged keys."""

    start: int
    end: int
    biased: bool
    groups: tuple[GroupShape, ...]


def layer_windows(cache) -> list[int] | None:
    """Each cache layer's sliding window (0 for a full-attention layer), None if a layer is of another kind."""
    windows = []
    for layer in cache.layers:
        if type(layer) is DynamicSlidingWindowLayer:
            windows.append(int(layer.sliding_window))
        elif type(layer) is DynamicLayer:
            windows.append(0)
        else:
            return None
    return windows


def stored_keys(layer) -> int:
    """Keys a dynamic cache layer holds (a sliding-window layer keeps only its last window - 1)."""
    keys = getattr(layer, "keys", None)
    return 0 if keys is None or keys.numel() == 0 else keys.shape[-2]


def round_up(n: int, bucket: int) -> int:
    return -(-n // bucket) * bucket


def structure(session, steps: int, bucket: int = BUCKET) -> tuple[SegmentShape, ...]:
    """The shapes a decoder for this session needs to feed `steps` more tokens (warm-up steps included)."""
    windows = layer_windows(session.cache)
    segments = []
    for segment in session.layout.segments:
        by_window: dict[int, list[int]] = {}
        for index in range(segment.start, segment.end):
            by_window.setdefault(windows[index], []).append(index)
        groups = []
        for window, layers in by_window.items():
            stored = {stored_keys(session.cache.layers[i]) for i in layers}
            if len(stored) != 1:
                raise ValueError(f"layers {layers} of one segment hold different lengths {sorted(stored)}")
            groups.append(GroupShape(tuple(layers), window, round_up(stored.pop() + steps, bucket)))
        segments.append(SegmentShape(segment.start, segment.end, segment.log_sizes is not None, tuple(groups)))
    return tuple(segments)


# ---------------------------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------------------------


class GroupBuffers:
    """A group's buffers and state on the device: built once, updated in place (their addresses never change)."""

    def __init__(self, shape: GroupShape, config, dtype: torch.dtype, device: torch.device, batch: int = 1):
        heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        size = (batch, heads, shape.capacity, head_dim)
        self.layers, self.window, self.capacity = shape.layers, shape.window, shape.capacity
        # zeros, not empty: a masked key's score is q.k + min, which must stay finite for the softmax to give it 0
        self.keys = [torch.zeros(size, dtype=dtype, device=device) for _ in shape.layers]
        self.values = [torch.zeros(size, dtype=dtype, device=device) for _ in shape.layers]
        self.index = torch.arange(shape.capacity, device=device)  # each key's index, compared with the write index
        self.stored = torch.zeros((), dtype=torch.long, device=device)  # keys the prefill left: the first write
        self.bias = torch.zeros(batch, shape.capacity, dtype=dtype, device=device)  # log(size) of merged keys, else 0
        # per row of a batch: False where its merged cache was padded to the longest row's (slerpviz.batch)
        self.slots = torch.ones(batch, shape.capacity, dtype=torch.bool, device=device)
        for tensor in (*self.keys, *self.values, self.index, self.stored, self.bias, self.slots):
            torch._dynamo.mark_static_address(tensor)
        # the capacity is symbolic from the first compile: one graph serves every prompt length (where nothing
        # specialises on it; torch.compile keeps it static otherwise, and compiles per capacity)
        for tensor in (*self.keys, *self.values):
            torch._dynamo.maybe_mark_dynamic(tensor, 2)
        torch._dynamo.maybe_mark_dynamic(self.index, 0)
        for tensor in (self.bias, self.slots):
            torch._dynamo.maybe_mark_dynamic(tensor, 1)


class SegmentBuffers:
    def __init__(self, shape: SegmentShape, config, dtype: torch.dtype, device: torch.device, batch: int = 1):
        self.start, self.end, self.biased = shape.start, shape.end, shape.biased
        self.offset = torch.zeros(batch, dtype=torch.float32, device=device)  # RoPE position - original, per row
        self.groups = [GroupBuffers(g, config, dtype, device, batch) for g in shape.groups]
        torch._dynamo.mark_static_address(self.offset)


class DecodeState:
    """Everything a step reads and writes, all on the device. `head`: the step ends in the LM head (the engine's
    runs), else in the final norm (the patch, whose model applies its own head). `batch`: rows decoded together
    (the patch's batches), each at its own positions and with its own padded slots hidden."""

    def __init__(self, shapes: tuple[SegmentShape, ...], config, dtype: torch.dtype, device: torch.device,
                 head: bool = True, batch: int = 1):
        self.head, self.batch = head, batch
        self.segments = [SegmentBuffers(s, config, dtype, device, batch) for s in shapes]
        self.length = torch.zeros(batch, dtype=torch.long, device=device)  # each row's original tokens at the load
        self.t = torch.zeros((), dtype=torch.long, device=device)  # tokens fed since the load
        # the step's input, copied in by `StaticDecoder.step`: one address for CUDA graphs, and one kind of tensor for
        # torch.compile's guards whether the caller's token was made in inference mode or not
        self.token = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.zero = torch.zeros((), dtype=dtype, device=device)
        self.hidden = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)  # a masked key's bias
        for tensor in (self.length, self.t, self.token, self.zero, self.hidden):
            torch._dynamo.mark_static_address(tensor)


class _Writes:
    """The cache a decoder layer's attention sees for one step: `update` writes the new key and value at the layer's
    write index, in place, and returns the whole buffers (the mask hides what is not written yet)."""

    def __init__(self, keys: dict, values: dict, where: dict):
        self.keys, self.values, self.where = keys, values, where

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values, where = self.keys[layer_idx], self.values[layer_idx], self.where[layer_idx]
        keys.index_copy_(2, where, key_states)
        values.index_copy_(2, where, value_states)
        return keys, values


def static_step(engine, state: DecodeState) -> torch.Tensor:
    """The token in `state.token` [B, 1] through every layer: the next token's logits [B, vocab], float32 (with
    `state.head`), else the final norm's output [B, 1, d] for the model's own head.

    Reads and advances `state.t`; nothing here makes a tensor on the host or reads one back.
    """
    decoder = engine.decoder
    h = decoder.embed_tokens(state.token)
    t = state.t
    position = (state.length + t).float()  # as the dynamic path: float32(original position) + offset, per row
    for segment in state.segments:
        cos_sin = decoder.rotary_emb(h, (position + segment.offset).view(-1, 1))
        keys, values, where, masks = {}, {}, {}, {}
        for group in segment.groups:
            write = group.stored + t  # every row writes here: a batch's merged caches are padded to one length
            visible = group.index <= write
            if group.window:
                visible = visible & (group.index > write - group.window)
            visible = visible & group.slots
            mask = torch.where(visible, group.bias if segment.biased else state.zero, state.hidden)
            at = write.view(1)
            for layer, k, v in zip(group.layers, group.keys, group.values):
                keys[layer], values[layer], where[layer] = k, v, at
                masks[layer] = mask.view(state.batch, 1, 1, -1)
        cache = _Writes(keys, values, where)
        for index in range(segment.start, segment.end):
            h = decoder.layers[index](
                h, attention_mask=masks[index], position_ids=None, cache=cache, use_cache=True,
                position_embeddings=cos_sin,
            )
    out = engine.head(h) if state.head else decoder.norm(h)
    t.add_(1)
    return out


_compiled = None
_compile_lock = threading.Lock()


def compiled_step():
    """`static_step` under torch.compile(mode="reduce-overhead", fullgraph=True), made once per process."""
    global _compiled
    with _compile_lock:
        if _compiled is None:
            _compiled = torch.compile(static_step, mode="reduce-overhead", fullgraph=True)
        return _compiled
