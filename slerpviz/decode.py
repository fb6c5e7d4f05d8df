"""Static decoding: one decode step for the base model and the merged one alike, on fixed-size buffers, with nothing
made on the host per step, so that it can be captured as a CUDA graph.

The engine's dynamic decode (`Session.decode`) grows a DynamicCache by one token per layer, builds each segment's
mask with transformers' mask builders and each segment's RoPE positions on the CPU, every step: a host-to-device copy
(a stream sync, from pageable memory) per segment and many small launches. A `StaticDecoder` is made from a
prefilled session instead:

- every layer gets a KV buffer of a fixed capacity: what the prefill left in that layer (shorter after each cutoff)
  plus the new tokens, rounded up to a bucket (`BUCKET`) so that different prompts share one shape;
- the session's DynamicCache is copied in once (`load`);
- a step reads one device counter `t` (tokens fed since the load): each segment's new token sits at RoPE position
  (prompt length + t) + the segment's offset, each layer writes its new key at (its prefill length + t), and a key
  of a layer is visible iff its index is at most that write index (and, on a sliding-window layer, within the window
  before it); proportional attention's log(tokens per slot) rides on the visible merged keys as an additive bias.
  All of it is arithmetic on tensors made at build time, so a step creates no tensor on the host, copies nothing to
  the device and reads nothing back; the extra room of a bucket is masked out, and masked keys add exactly 0 to the
  softmax;
- `step(token)` takes the token id as a device tensor [1, 1] and returns the next token's logits [1, vocab] (float32)
  on the device; the caller reads the chosen token once (the step's one sync, for its text). A decoder built without
  `head` (the patch's: the model applies its own LM head) returns the final norm's output [1, 1, d] instead;
- a decoder for a batch (the patch's, slerpviz.batch) holds a row per sequence in every buffer: each row at its own
  positions, its padded slots hidden by the mask; every row writes its new key at the same index, since a batch's
  merged caches are padded to one length per layer.

`graphed=True` records the eager step once as a CUDA graph (torch.cuda.CUDAGraph) over the decoder's own buffers, so
one step is one graph launch and nothing is compiled: recording costs a few steps' time, per decoder, in `warm_up()`.
`compiled=True` wraps the step in `torch.compile(mode="reduce-overhead", fullgraph=True)` instead: also a CUDA graph,
of kernels inductor fused, after a compile of tens of seconds per structure. Both happen in `warm_up()` (seconds,
reported apart from the steps).

What compiles again (torch.compile's guards), and what does not:
- one compiled step serves every engine and decoder in the process; a new graph is compiled for each new structure:
  the segments' layer ranges (the cutoffs), whether each segment carries a proportional bias (proportional on, and
  some slot holding several tokens), the sliding windows, the attention implementation, dtype and device. The
  buffers' capacity is a symbolic size from the first compile, so every prompt length and `max_new_tokens` reuses
  that graph; CUDA graphs are still recorded per capacity and buffer set (a few eager steps' time, no compile), and
  capacities are rounded up to multiples of `BUCKET` so that nearby lengths share one recording;
- decoders are pooled per engine and structure (`acquire`, `release`): a later run whose buffers have the same
  capacities reuses them, so the recorded CUDA graph replays as it is; `MAX_IDLE` idle decoders are kept per engine
  (the oldest is dropped), since each holds a full-depth KV cache: `clear(engine)` frees them;
- torch.compile keeps at most `torch._dynamo.config.recompile_limit` (8 by default) graphs per code: past that it
  runs the step uncompiled (still exact, just slower).
`warm_up(engine, settings)` compiles the structures of a list of merge settings ahead of any run.

What falls back to the dynamic decode, and why (`unsupported`): an attention implementation other than sdpa or eager
(flash attention and flex take no additive mask), RoPE that recomputes its frequencies from the positions (`dynamic`,
`longrope`: a host-side branch per step), cache layers other than transformers' dynamic and dynamic sliding-window
ones, and sliding windows with proportional attention (which the engine refuses anyway). Sliding-window layers are
supported exactly: the buffer holds what the dynamic cache kept (its last window - 1 keys) and the mask applies the
window to the same relative indices.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

import torch

from .decode_step import (  # noqa: F401  (BUCKET, the shapes and structure are this module's names too)
    BUCKET, DecodeState, GroupBuffers, GroupShape, SegmentShape, compiled_step, layer_windows, static_step,
    stored_keys, structure,
)
from .forward import Interrupted
from .settings import MergeSettings

MAX_IDLE = 2  # idle decoders pooled per engine (each holds a KV cache of the model's full depth)
WARM_UP_STEPS = 3  # CUDA graph trees run a function eagerly once, record it on the second call and replay after
DECODE_MODES = ("dynamic", "static", "graph", "compiled")
SUPPORTED_ATTENTION = ("sdpa", "eager")


def default_mode(device: torch.device) -> str:
    """The decode a run uses when none is asked for.

    On a GPU each step is a few hundred small kernels whose launches, plus the dynamic path's host-to-device copies,
    cost more than the work: the static step recorded as a CUDA graph launches one graph, and recording it costs a
    few steps, where torch.compile costs tens of seconds for every new set of cutoffs the page is given (and gives
    up past 8 of them). On a CPU there is no launch overhead to save: dynamic. On a ZeroGPU Space (SPACES_ZERO_GPU)
    each generation runs in a worker that holds the GPU for that call alone, so what was recorded would not outlive
    it: static, unrecorded.
    """
    if torch.device(device).type != "cuda":
        return "dynamic"
    return "static" if os.environ.get("SPACES_ZERO_GPU") else "graph"


def check_mode(mode: str | None) -> None:
    if mode is not None and mode not in DECODE_MODES:
        raise ValueError(f"unknown decode {mode!r}; choose one of {', '.join(DECODE_MODES)}")


def unsupported(session) -> str | None:
    """Why this session cannot decode static exactly, or None when it can."""
    engine = session.engine
    if session.cache is None:
        return "the session was prefilled without a cache"
    attention = getattr(engine.config, "_attn_implementation", None) or "eager"
    if attention not in SUPPORTED_ATTENTION:
        return f"the {attention} attention implementation takes no additive mask (static decode runs sdpa or eager)"
    rope = getattr(engine.decoder.rotary_emb, "rope_type", "default")
    rope_types = rope.values() if isinstance(rope, dict) else [rope]
    if any("dynamic" in r or r == "longrope" for r in rope_types):
        return f"{rope} RoPE recomputes its frequencies from the positions on the host every step"
    windows = layer_windows(session.cache)
    if windows is None:
        return "a cache layer is neither a dynamic nor a dynamic sliding-window layer"
    if {layer.keys.device for layer in session.cache.layers if getattr(layer, "keys", None) is not None} - {
            engine.device}:
        return "the layers sit on several devices (static buffers live on the embeddings' device)"
    if any(windows) and any(s.log_sizes is not None for s in session.layout.segments):
        return "proportional attention with sliding-window layers is not supported"
    return None


# ---------------------------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------------------------


class StaticDecoder:
    """Static KV buffers for one structure (see `structure`), loaded from a session, and its step.

    Get one with `acquire(session, max_new_tokens)`, `warm_up()` it (seconds; compiles and captures on first use),
    call `step(token)` once per token, `release()` it when the run is done.
    """

    def __init__(self, engine, shapes: tuple[SegmentShape, ...], compiled: bool = False, graphed: bool = False,
                 head: bool = True, batch: int = 1):
        self.engine, self.shapes, self.compiled = engine, shapes, compiled
        self.key = pool_key(shapes, compiled, graphed, head, batch)  # its place in the pool: what it was built for
        self.state = DecodeState(shapes, engine.config, engine.dtype, engine.device, head, batch)
        self.capacity = min(g.capacity for s in shapes for g in s.groups)
        self.warm = False  # warmed (compiled and captured) for its buffers
        self.fallback = ""  # why a compiled or graphed decoder runs otherwise, if it does
        self.graphed = graphed and engine.device.type == "cuda"
        if graphed and not self.graphed:
            self.fallback = "CUDA graphs need a GPU; decoding uncaptured"
        self._graph, self._graph_logits = None, None  # the recorded step and the tensor its replays write
        self._step = compiled_step() if compiled else static_step
        self.stored_keys: list[int] = []  # per group: keys the prefill left (host copies of state, for the bounds)
        self._cumulative: list[int] = []  # per layer: tokens the layer has seen (a sliding layer's full count)
        self.steps = 0  # tokens fed since the load (host count, kept beside the device counter)

    # -- loading a session ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def load(self, session) -> "StaticDecoder":
        """Copy the session's cache and layout in; the next step continues the session's tokens. A batch's session
        (slerpviz.batch) gives each row's length, and per segment each row's offset, sizes and slots."""
        cache, state = session.cache, self.state
        if session.rows != state.batch:
            raise ValueError(f"a decoder for {state.batch} rows cannot load a session of {session.rows}")
        state.length.copy_(torch.as_tensor(session.length).expand(state.batch))
        state.t.zero_()
        self.stored_keys = []
        for index, segment in enumerate(state.segments):
            offset, log_sizes, slots = session.segment_rows(index)
            segment.offset.copy_(torch.as_tensor(offset, dtype=torch.float32).expand(state.batch))
            for group in segment.groups:
                stored = stored_keys(cache.layers[group.layers[0]])
                group.stored.fill_(stored)
                self.stored_keys.append(stored)
                for layer, k, v in zip(group.layers, group.keys, group.values):
                    k[:, :, :stored].copy_(cache.layers[layer].keys)
                    v[:, :, :stored].copy_(cache.layers[layer].values)
                group.slots.fill_(True)
                if slots is not None:  # a batch's rows padded to one length (a sliding layer holds them all)
                    group.slots[:, :slots.shape[-1]].copy_(slots)
                if segment.biased:
                    group.bias.zero_()  # tokens after the prompt hold one token each: bias 0, as the dynamic mask
                    bias = log_sizes.to(device=group.bias.device, dtype=torch.float32)
                    group.bias[:, : bias.shape[-1]].copy_(bias.to(group.bias.dtype))
        self._cumulative = [layer.get_seq_length() for layer in cache.layers]
        self.steps = 0
        return self

    # -- stepping ---------------------------------------------------------------------------------------------------

    def room(self) -> int:
        """Tokens that can still be fed before a buffer is full."""
        return min(g.capacity - s for g, s in zip(self._groups(), self.stored_keys)) - self.steps

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token a row (a device tensor [B, 1] of ids); the next token's logits [B, vocab] on the device (a
        decoder built without `head`: the final norm's output [B, 1, d])."""
        if self.room() < 1:
            raise ValueError(f"the static decoder is full ({self.steps} tokens fed since its load)")
        interrupt = self.engine._interrupt  # a step is one graph: a Stop takes effect between steps
        if interrupt is not None and interrupt.is_set():
            raise Interrupted("the run was stopped")
        self.state.token.copy_(token.view(self.state.batch, 1))
        if self._graph is not None:
            self._graph.replay()
            logits = self._graph_logits.clone()  # the next replay overwrites it
        elif self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
            # a graph's output is overwritten by its next replay: a copy the caller may keep
            logits = self._step(self.engine, self.state).clone()
        else:
            logits = self._step(self.engine, self.state)
        self.steps += 1
        return logits

    @torch.inference_mode()
    def warm_up(self, steps: int = WARM_UP_STEPS) -> float:
        """Compile and capture the step (first use of a structure) or warm its kernels, then rewind to the load.

        Returns the seconds it took (0 when this decoder is already warm). The steps feed token 0 where the next
        real tokens go; rewinding the counter makes those writes invisible until real steps overwrite them.
        """
        if self.warm:
            return 0.0
        if self.room() < steps:
            raise ValueError("the static decoder has no room to warm up")
        self.engine.sync()
        began = time.perf_counter()
        token = torch.zeros((self.state.batch, 1), dtype=torch.long, device=self.engine.device)
        try:
            for _ in range(steps):
                self.step(token)
        except Interrupted:
            raise
        except Exception as error:  # noqa: BLE001 - any compile failure: exact tokens, uncompiled
            if not self.compiled:
                raise
            self.compiled, self._step = False, static_step
            self.fallback = f"torch.compile failed ({type(error).__name__}: {error}); decoding uncompiled"
            self.state.t.zero_()
            self.steps = 0
            for _ in range(steps):
                self.step(token)
        self.state.t.zero_()
        self.steps = 0
        if self.graphed:
            try:
                self._record_graph()
            except Exception as error:  # noqa: BLE001 - any capture failure: exact tokens, uncaptured
                self.graphed, self._graph, self._graph_logits = False, None, None
                self.fallback = f"CUDA graph capture failed ({type(error).__name__}: {error}); decoding uncaptured"
            self.state.t.zero_()
        self.engine.sync()
        self.warm = True
        return time.perf_counter() - began

    @torch.inference_mode()
    def _record_graph(self) -> None:
        """Record one step as a CUDA graph over this decoder's buffers. Recording runs nothing (the counter does not
        move); the capture asks for a warm-up on a side stream first, which the caller rewinds."""
        engine, state = self.engine, self.state
        side = torch.cuda.Stream(device=engine.device)
        side.wait_stream(torch.cuda.current_stream(engine.device))
        with torch.cuda.stream(side):
            static_step(engine, state)
        torch.cuda.current_stream(engine.device).wait_stream(side)
        state.t.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = static_step(engine, state)
        self._graph, self._graph_logits = graph, logits

    # -- what the trace shows ---------------------------------------------------------------------------------------

    def kv_lengths(self) -> list[int]:
        """Tokens (slots) each layer holds, as the dynamic cache would count them (`forward.cache_lengths`)."""
        return [n + self.steps for n in self._cumulative]

    def kv_bytes(self) -> list[int]:
        """Bytes of keys and values each layer holds, as the dynamic cache would (not the buffers' capacity)."""
        sizes = [0] * self.engine.num_layers
        for group, stored in zip(self._groups(), self.stored_keys):
            keys = group.keys[0]
            per_token = 2 * keys.shape[0] * keys.shape[1] * keys.shape[3] * keys.element_size()
            held = stored + self.steps
            if group.window:
                held = min(held, group.window - 1)
            for layer in group.layers:
                sizes[layer] = per_token * held
        return sizes

    def buffer_bytes(self) -> int:
        """Bytes the buffers take (their full capacity)."""
        return sum(t.numel() * t.element_size() for g in self._groups() for t in (*g.keys, *g.values))

    def _groups(self) -> list[GroupBuffers]:
        return [g for s in self.state.segments for g in s.groups]

    # -- the pool ---------------------------------------------------------------------------------------------------

    def release(self) -> None:
        """Hand the decoder back to its engine's pool for a later run with the same structure."""
        _release(self)


def start_decoding(session, max_new_tokens: int, mode: str | None, head: bool = True
                   ) -> tuple[StaticDecoder | None, str, float]:
    """What a run decodes with after its prefill: (the static decoder or None for dynamic, the path as the trace
    records it, warm-up seconds). A session the static decoder cannot run exactly decodes dynamic, and says why.
    `head`: the steps give logits (the engine's runs), else the final norm's output (the patch)."""
    check_mode(mode)
    mode = mode or default_mode(session.engine.device)
    if mode == "dynamic" or max_new_tokens < 1:
        return None, "dynamic", 0.0
    reason = unsupported(session)
    if reason is not None:
        return None, f"dynamic ({reason})", 0.0
    began = time.perf_counter()
    decoder = acquire(session, max_new_tokens, compiled=mode == "compiled", graphed=mode == "graph", head=head)
    decoder.warm_up()
    seconds = time.perf_counter() - began  # buffers, the cache's copy and, on first use, compiling and capturing
    path = f"static ({decoder.fallback})" if decoder.fallback else mode
    return decoder, path, seconds


def warm_up(engine, settings: Iterable[MergeSettings] = (MergeSettings(),), mode: str | None = None,
            prompt_length: int = 64, max_new_tokens: int = 8) -> float:
    """Compile and capture the decode step of each of these merge settings now, on a random prompt, so that runs
    with them (any prompt length) find it ready; seconds it took. Nothing to do for dynamic decoding."""
    check_mode(mode)
    mode = mode or default_mode(engine.device)
    if mode == "dynamic":
        return 0.0
    generator = torch.Generator().manual_seed(0)
    seconds = 0.0
    for merge in settings:
        length = max(prompt_length, merge.most_protected + 2)
        ids = torch.randint(0, engine.config.vocab_size, (1, length), generator=generator).to(engine.device)
        decoder, _, spent = start_decoding(engine.prefill(ids, merge), max_new_tokens, mode)
        if decoder is not None:
            decoder.release()
        seconds += spent
    return seconds


_pool_lock = threading.Lock()
POOL_ATTRIBUTE = "_slerpviz_static_decoders"  # on the engine: {decoder.key: [idle decoders]}, oldest first


def acquire(session, max_new_tokens: int, compiled: bool = False, bucket: int = BUCKET, graphed: bool = False,
            head: bool = True) -> StaticDecoder:
    """A decoder loaded with the session, room for `max_new_tokens` more tokens (and the warm-up): an idle one of
    the same structure from the engine's pool, else a new one."""
    reason = unsupported(session)
    if reason is not None:
        raise ValueError(f"static decoding cannot run this session: {reason}")
    shapes = structure(session, max(int(max_new_tokens), WARM_UP_STEPS), bucket)
    key = pool_key(shapes, compiled, graphed, head, session.rows)
    with _pool_lock:
        idle = _pool(session.engine).get(key)
        decoder = idle.pop() if idle else None
    if decoder is None:
        decoder = StaticDecoder(session.engine, shapes, compiled, graphed, head, session.rows)
    return decoder.load(session)


def pool_key(shapes: tuple[SegmentShape, ...], compiled: bool, graphed: bool, head: bool, batch: int = 1) -> tuple:
    """What a decoder was built for, and so which runs may take it from the pool."""
    return shapes, bool(compiled), bool(graphed), bool(head), int(batch)


def _pool(engine) -> OrderedDict:
    # Kept on the engine itself, so that the decoders (which hold the engine) go when the engine goes.
    pool = engine.__dict__.get(POOL_ATTRIBUTE)
    if pool is None:
        pool = engine.__dict__[POOL_ATTRIBUTE] = OrderedDict()
    return pool


def _release(decoder: StaticDecoder) -> None:
    with _pool_lock:
        pool = _pool(decoder.engine)
        if any(d is decoder for idle in pool.values() for d in idle):
            return
        pool.setdefault(decoder.key, []).append(decoder)
        pool.move_to_end(decoder.key)
        while sum(len(v) for v in pool.values()) > MAX_IDLE:
            oldest = next(iter(pool))
            pool[oldest].pop(0)
            if not pool[oldest]:
                del pool[oldest]


def idle(engine) -> int:
    """Idle decoders pooled for this engine."""
    with _pool_lock:
        return sum(len(v) for v in engine.__dict__.get(POOL_ATTRIBUTE, {}).values())


def clear(engine) -> None:
    """Drop the engine's idle decoders (and their buffers)."""
    with _pool_lock:
        engine.__dict__.pop(POOL_ATTRIBUTE, None)
