"""The engine: runs a Hugging Face causal LM layer by layer and merges tokens at the cutoffs.

This is the one module that knows transformers internals. The forward pass reads top to bottom:
embed -> [layers on the full sequence] -> merge -> [layers on the merged sequence] -> ... -> norm -> lm_head.
Each layer keeps its own KV cache, so layers after a cutoff hold a shorter cache; decode steps feed one token
through every layer with the position that token has in that layer's sequence.

One merging forward (`_forward_prompt`, `_forward_new`) serves three callers: `prefill` returns a Session (the
caches, the stages that ran, `decode`), `Run` generates step by step for the app, the CLI and the benchmarks, and
`MergingForward` stands in for a model's own decoder forward under the patch (slerpviz.patch).
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
import transformers

# The engine calls decoder layers with transformers 5.x keyword arguments (`cache`, `position_embeddings`, a tensor
# returned) and builds masks per layer index with the `cache` keyword; 5.18 still spelled that differently, so the
# range starts at the release the tests run on (requirements.txt) and stops before the next major version.
TESTED_TRANSFORMERS = ("5.24", "6.0")  # [low, high)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


def check_transformers_version(version: str) -> None:
    low, high = TESTED_TRANSFORMERS
    if not _version_tuple(low) <= _version_tuple(version) < _version_tuple(high):
        raise ImportError(f"slerpviz needs transformers >={low},<{high}; this environment has {version}")


check_transformers_version(transformers.__version__)

from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from .settings import (  # noqa: F401  (MODES, MergeSettings and Sampling are the engine's names too)
    MODES, MergeSettings, Sampling, attention_budget, check_choice, check_method, check_mode, check_positions,
    check_sampling, real,
)
from .merge import (
    INTERPOLATE, PLANNED_AT_CUTOFF, adjacent_cosines, cosine, gather_pairs, ratio_per_stage, slerp_and_cosine,
)
from .pairs import Stage, check_spans, last_slot_offset, layer_lengths, next_stage, plan_stages, slot_positions

SUPPORTED_FAMILIES = ("mistral", "llama", "qwen2")


MAX_CHARS_PER_TOKEN = 64  # far more than any tokenizer puts in one token of text


class Interrupted(Exception):
    """A step stopped between two layers because its run's interrupt was set (the page's Stop)."""


@dataclass
class Trace:
    """What one run did: the plan, the shapes per layer, and the timings. Plots are drawn from this alone."""

    tokens: list[str]  # prompt tokens as text
    groups: list[list[list[int]]]  # per stage: the original positions of each slot
    protected: list[list[bool]]  # per stage: is the slot protected
    cutoffs: list[int]
    seq_len_per_layer: list[int]
    num_layers: int
    mode: str
    settings: dict
    pair_cosines: list[list[float]] = field(default_factory=list)  # per stage: cosine of each merged pair
    # per stage, for the `attention` choice: attention each slot received from the last prompt tokens at the cutoff
    attention_scores: list[list[float]] = field(default_factory=list)
    kv_bytes_per_layer: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)
    generated_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    plan_pending: bool = False  # `similar` and `attention` are planned at the cutoff, during the prefill
    slot_sizes: list[list[int]] = field(default_factory=list)  # per stage: original tokens in each slot
    decode: str = ""  # the decode steps' path (slerpviz.decode), and why it fell back to dynamic if it did
    decode_warmup_s: float = 0.0  # readying the static decoder (compiling, capturing on first use): in no step

    @property
    def prompt_length(self) -> int:
        return len(self.tokens)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Step:
    """One generated token: its id, the new text it completes (may be empty), and the seconds it took."""

    token_id: int
    text: str
    seconds: float


@dataclass(frozen=True)
class _Segment:
    """Layers [start, end) run on one sequence; a new token sits at original position + offset there.

    `log_sizes` holds log(tokens per slot) when proportional attention is on and some slot holds more than one.
    """

    start: int
    end: int
    offset: float
    log_sizes: torch.Tensor | None = None


@dataclass(frozen=True)
class Layout:
    """What a prefill decided, for the decode steps and the trace: the segments and the realised merge stages."""

    segments: list[_Segment]
    stages: list[Stage]
    attention: list[torch.Tensor | None] = field(default_factory=list)  # per stage: scores of the `attention` choice


def check_supported(model) -> None:
    family = getattr(model.config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"model family {family!r} is not supported; slerpviz runs {', '.join(SUPPORTED_FAMILIES)} decoders"
        )


class MergingEngine:
    def __init__(self, model, tokenizer):
        check_supported(model)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.decoder = model.model  # embed_tokens, layers, rotary_emb, norm
        self.num_layers = self.config.num_hidden_layers
        self.eos_ids = _eos_ids(model, tokenizer)
        self._interrupt = None  # an Event the step under way checks between layers (see `interruptible`)

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    # ---------------------------------------------------------------------------------------------------------------
    # Input
    # ---------------------------------------------------------------------------------------------------------------

    def encode(self, prompt: str, chat: bool = True) -> torch.Tensor:
        """Token ids [1, n] of the prompt, through the model's chat template when it has one and chat is on."""
        if not prompt or not prompt.strip():
            raise ValueError("the prompt is empty")
        # Tokenising is not free (30 MB of text takes over a minute): refuse what cannot fit before reading it.
        context = getattr(self.config, "max_position_embeddings", None)
        if context is not None and len(prompt) > MAX_CHARS_PER_TOKEN * context:
            raise ValueError(f"the prompt has {len(prompt):,} characters: more than could fit the model's context of "
                             f"{context:,} tokens (at {MAX_CHARS_PER_TOKEN} characters a token at most)")
        if chat and getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
            )["input_ids"]
        else:
            ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        return ids.to(self.device)

    def token_strings(self, ids: torch.Tensor) -> list[str]:
        return self.tokenizer.batch_decode([[i] for i in ids.flatten().tolist()])

    def validate(self, length: int, settings: MergeSettings, sampling: Sampling | None = None, mode: str = "cached"):
        """Refuse bad settings with a message that says what is allowed."""
        if length < 1:
            raise ValueError("the prompt is empty")
        for cutoff in settings.cutoffs:
            if not isinstance(cutoff, int) or not 0 <= cutoff <= self.num_layers:
                raise ValueError(f"cutoff {cutoff!r} is out of range: choose a layer from 0 to {self.num_layers}")
        check_spans(length, settings.keep_start, settings.keep_end)
        check_method(settings.method)
        check_positions(settings.positions)
        check_choice(settings.choice)
        ratio_per_stage(settings.ratio, len(settings.cutoffs))
        if settings.proportional and any(_is_sliding(self.config, i) for i in range(self.num_layers)):
            # A sliding-window cache drops old keys, so a per-slot bias would no longer line up with its keys.
            raise ValueError("proportional attention is not supported on models with sliding-window attention layers")
        attn = getattr(self.config, "_attn_implementation", None)
        if settings.proportional and attn not in ("sdpa", "eager"):
            # Its log(size) bias goes into the additive attention mask, a tensor only sdpa and eager attention take.
            raise ValueError(f"proportional attention needs sdpa or eager attention (it adds log(size) to the "
                             f"attention mask), and this model runs {attn!r}: load it with attn_implementation="
                             "'sdpa', or merge without proportional attention")
        # The same rules, and words, as the page and the command line use for the raw values (slerpviz.settings).
        attention_budget(settings.attention_window, settings.attention_keep, settings.attention_reach,
                         settings.attention_keep_share)
        real(settings.cosine_share, "cosine share", 0, 1)
        check_mode(mode)
        if sampling is not None:
            check_sampling(sampling)
            context = getattr(self.config, "max_position_embeddings", None)
            if context is not None and length + sampling.max_new_tokens > context:
                raise ValueError(
                    f"the prompt ({length} tokens) plus {sampling.max_new_tokens} new tokens is longer than the "
                    f"model's context of {context} tokens"
                )

    def plan(self, input_ids: torch.Tensor, settings: MergeSettings) -> list[Stage] | None:
        """The merge stages for a prompt, or None for `similar` and `attention`, which are planned at each cutoff."""
        self.validate(input_ids.shape[-1], settings)
        if settings.choice in PLANNED_AT_CUTOFF:
            return None
        return plan_stages(input_ids.shape[-1], settings.cutoffs, settings.keep_start, settings.keep_end,
                           settings.ratio, settings.choice, settings.size_weighted)

    def new_trace(self, input_ids: torch.Tensor, settings: MergeSettings, mode: str = "cached",
                  preview: bool = True) -> Trace:
        """The trace of a run before it starts: the shapes and, with `preview`, the plan as far as it is known
        before the prefill (not for `similar` and `attention`, which depend on the hidden states). A run's own trace
        takes no preview: it records the stages that actually ran, from its session."""
        if preview:
            stages = self.plan(input_ids, settings)  # validates
        else:
            self.validate(input_ids.shape[-1], settings)
            stages = None
        trace = Trace(
            tokens=self.token_strings(input_ids), groups=[], protected=[], cutoffs=list(settings.cutoffs),
            seq_len_per_layer=[], num_layers=self.num_layers, mode=mode, settings=asdict(settings),
            plan_pending=stages is None,
        )
        if stages is not None:
            record_plan(trace, stages)
        return trace

    # ---------------------------------------------------------------------------------------------------------------
    # The forward pass
    # ---------------------------------------------------------------------------------------------------------------

    def _run_layers(
        self, h: torch.Tensor, start: int, end: int, positions: torch.Tensor, cache,
        log_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Layers [start, end) on h [1, L, d]; positions [L] go only into RoPE, never into the mask builders.

        With `log_sizes`, the attention logit of each cached or current key that stands for several tokens is
        raised by log(tokens), through an additive float mask (works with sdpa and eager alike).
        """
        position_embeddings = self.decoder.rotary_emb(h, positions[None].to(h.device))
        # One mask per attention type, all built before any layer of the segment writes its cache, each sized
        # against the cache of the segment's first layer of that type (as transformers builds them per forward).
        first_of_type: dict[bool, int] = {}
        for index in range(start, end):
            first_of_type.setdefault(_is_sliding(self.config, index), index)
        masks = {}
        for sliding, layer_idx in first_of_type.items():
            build = create_sliding_window_causal_mask if sliding else create_causal_mask
            # position_ids=None: merged positions do not step by 1 and would read as packed sequences.
            masks[sliding] = build(
                config=self.config, inputs_embeds=h, attention_mask=None, cache=cache, position_ids=None,
                layer_idx=layer_idx, allow_is_causal_skip=log_sizes is None,
            )
            if log_sizes is not None:
                masks[sliding] = _add_key_bias(masks[sliding], log_sizes, h.dtype)
        for index in range(start, end):
            if self._interrupt is not None and self._interrupt.is_set():
                raise Interrupted("the run was stopped")
            h = self.decoder.layers[index](
                h, attention_mask=masks[_is_sliding(self.config, index)], position_ids=None, cache=cache,
                use_cache=cache is not None, position_embeddings=position_embeddings,
            )
        return h

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token logits [1, vocab] from the last position only, as generate() computes them."""
        return self.model.lm_head(self.decoder.norm(h[:, -1:]))[:, -1].float()

    def _forward_prompt(
        self, h: torch.Tensor, settings: MergeSettings, cache=None, stages: list[Stage] | None = None,
        run_layers: bool = True,
    ) -> tuple[torch.Tensor, Layout, list[torch.Tensor]]:
        """The prompt's embeddings h [1, L, d] through every layer, merging at each cutoff (planned there, from the
        hidden states when the choice needs them, unless `stages` replays a plan). Returns the last layer's output,
        one row per final slot (before the final norm), the layout (for new tokens) and each merged pair's cosine.

        The one merging forward: the engine's sessions and the patch on a model's own forward both run it; without
        `run_layers` it does only the merges (`merge_only`, which the speed benchmark times).
        """
        length = h.shape[1]
        cutoffs = settings.cutoffs if stages is None else tuple(stage.cutoff for stage in stages)
        ratios = ratio_per_stage(settings.ratio, len(settings.cutoffs))
        # Everything a stage builds lives on the hidden states' device: nothing per slot is read back to the host.
        positions = torch.arange(length, dtype=torch.float32, device=h.device)
        first = last = torch.arange(length, device=h.device)
        log_sizes, offset = None, 0
        segments, realised, cosines, scores, start = [], [], [], [], 0
        for index, cutoff in enumerate([*cutoffs, None]):
            end = self.num_layers if cutoff is None else cutoff
            if end > start:
                if run_layers:
                    h = self._run_layers(h, start, end, positions, cache, log_sizes)
                segments.append(_Segment(start, end, offset, log_sizes))
                start = end
            if cutoff is None:
                break
            merged = self.merge_at_cutoff(h, first, last, positions, log_sizes, cutoff, settings,
                                          ratios[index] if stages is None else 1.0,
                                          stages[index] if stages is not None else None, length)
            h, positions, log_sizes = merged.hidden, merged.positions, merged.log_sizes
            offset = last_slot_offset(length, merged.stage.plan.merged_length, settings.positions)
            first, last = merged.stage.first, merged.stage.last
            cosines.append(merged.cosines)
            realised.append(merged.stage)
            scores.append(merged.attention)
        return h, Layout(segments, realised, scores), cosines

    def _forward_new(self, h: torch.Tensor, position: int, layout: Layout, cache) -> torch.Tensor:
        """New tokens' embeddings h [1, n, d], the first at original position `position`, through every layer's
        cache; each layer places them after its own (possibly merged) sequence."""
        new = torch.arange(h.shape[1], dtype=torch.float32, device=h.device) + position  # no host tensor per step
        for segment in layout.segments:
            h = self._run_layers(h, segment.start, segment.end, new + segment.offset, cache, segment.log_sizes)
        return h

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, settings: MergeSettings = MergeSettings(), cached: bool = True,
                stages: list[Stage] | None = None) -> "Session":
        """Run the prompt [1, L], merging at each cutoff, into a fresh per-layer cache (none when not `cached`).

        `stages` replays a plan instead of planning (a one-pass reference for cached decoding, in the tests).
        """
        self.validate(input_ids.shape[-1], settings)
        cache = DynamicCache(config=self.config) if cached else None
        h, layout, cosines = self._forward_prompt(self.decoder.embed_tokens(input_ids), settings, cache, stages)
        return Session(self, cache, layout, cosines, input_ids.shape[-1], self._logits(h))

    @torch.inference_mode()
    def merge_only(self, h: torch.Tensor, settings: MergeSettings) -> Layout:
        """Everything a prefill of hidden states h [1, L, d] does at its cutoffs (the attention choice's scoring
        included) and nothing else: the layers between them are skipped, so h reaches every cutoff as it is."""
        self.validate(h.shape[1], settings)
        return self._forward_prompt(h, settings, run_layers=False)[1]

    # ---------------------------------------------------------------------------------------------------------------
    # The merge at a cutoff
    # ---------------------------------------------------------------------------------------------------------------

    def merge_at_cutoff(
        self, h: torch.Tensor, first: torch.Tensor, last: torch.Tensor, positions: torch.Tensor,
        log_sizes: torch.Tensor | None, cutoff: int, settings: MergeSettings, ratio: float, stage: Stage | None = None,
        prompt_length: int | None = None,
    ) -> "Merged":
        """Everything a prefill does at a cutoff besides running layers: plan the stage (from h for `similar` and
        `attention`) unless one is replayed, the pair cosines, the interpolation, the slots' positions and sizes.

        On the device throughout: the plan reads one number back (the slots' count) only where the choice cannot
        know it ahead, `similar` and the attention choice's kept budget."""
        prompt_length = first.numel() if prompt_length is None else prompt_length  # tokens before any merge
        attention = None
        if stage is None:
            mixed = settings.choice == "attention" and settings.cosine_share > 0
            similarity = adjacent_cosines(h)[0] if settings.choice == "similar" or mixed else None
            if settings.choice == "attention":
                attention = self.attention_received(cutoff, h, positions, settings.attention_window, log_sizes)
            stage = next_stage(first, last, cutoff, settings.keep_start, settings.keep_end, ratio, settings.choice,
                               similarity, settings.size_weighted, attention, settings.kept_budget(prompt_length),
                               settings.cosine_share, settings.attention_reach)
        else:
            stage = stage.to(h.device)  # a replayed plan may have been made on the CPU
        a, b = gather_pairs(h, stage.plan)
        check_method(settings.method)
        if settings.method == "slerp":
            hidden, cosines = slerp_and_cosine(a, b, stage.plan.t)
        else:
            hidden, cosines = INTERPOLATE[settings.method](a, b, stage.plan.t), cosine(a, b)
        slots = slot_positions(stage.first, stage.last, settings.positions)
        several = settings.proportional and stage.plan.merged_length < prompt_length  # some slot holds several
        log_sizes = stage.sizes.float().log() if several else None
        # Each slot's two members' cosine (0 for a single, whose partner is the zero row); the trace keeps the pairs'.
        return Merged(hidden, stage, cosines, slots, log_sizes, attention)

    def attention_received(
        self, cutoff: int, h: torch.Tensor, positions: torch.Tensor, window: int,
        log_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention each of the L items of h [1, L, d] receives from the last `window` items, at the layer after
        the cutoff: [L], averaged over heads and queries.

        The layer's own input norm, q/k projections, RoPE at the items' positions and grouped KV heads, causal, with
        proportional attention's log(size) when it is on; W queries against L keys, never the whole L × L matrix.
        """
        layer = self.decoder.layers[min(cutoff, self.num_layers - 1)]
        attention = layer.self_attn
        length, head_dim = h.shape[1], attention.head_dim
        queries = min(int(window), length)  # validate() lets 8.0 pass as 8, as the page does
        x = layer.input_layernorm(h)[0]
        q = attention.q_proj(x[-queries:]).view(queries, -1, head_dim).transpose(0, 1)  # [heads, W, hd]
        k = attention.k_proj(x).view(length, -1, head_dim).transpose(0, 1)  # [kv heads, L, hd]
        cos, sin = self.decoder.rotary_emb(h, positions[None])
        rotate_half = sys.modules[type(attention).__module__].rotate_half  # RoPE as the model applies it
        q = q * cos[0, -queries:] + rotate_half(q) * sin[0, -queries:]
        k = k * cos[0] + rotate_half(k) * sin[0]
        # Query heads grouped under the KV head they share ([kv heads, groups·W, hd]): no copy of the keys per head.
        q = q.reshape(k.shape[0], -1, head_dim)
        logits = (q.float() @ k.float().transpose(-1, -2)) * attention.scaling
        if log_sizes is not None:
            logits = logits + log_sizes
        # Query r sits at item L - W + r and sees the items up to it.
        future = torch.ones(queries, length, dtype=torch.bool, device=h.device).triu(length - queries + 1)
        logits = logits.view(k.shape[0], -1, queries, length).masked_fill(future, float("-inf"))
        return logits.softmax(-1).mean(dim=(0, 1, 2))

    @torch.inference_mode()
    def attention_by_layer(self, input_ids: torch.Tensor, window: int) -> torch.Tensor:
        """[layers, L]: what the `attention` choice would score at a cutoff at each layer of the unmerged prompt
        [1, L] — row c is `attention_received` at cutoff c — from one plain forward of the model."""
        hidden = self.model(input_ids.to(self.device), output_hidden_states=True, use_cache=False).hidden_states
        positions = torch.arange(input_ids.shape[-1])
        # hidden[c] is what enters layer c: the embeddings, then each layer's output.
        return torch.stack([self.attention_received(c, hidden[c], positions, window)
                            for c in range(self.num_layers)]).cpu()

    # ---------------------------------------------------------------------------------------------------------------
    # Generation
    # ---------------------------------------------------------------------------------------------------------------

    def start(
        self, input_ids: torch.Tensor, settings: MergeSettings = MergeSettings(), sampling: Sampling = Sampling(),
        mode: str = "cached", interrupt: threading.Event | None = None, decode: str | None = None,
    ) -> "Run":
        """Validate and plan now; the returned run generates lazily, one token per step. Setting `interrupt` stops
        the step under way at its next layer (a long prefill need not run to its end after Stop). `decode` picks
        the decode steps' path (slerpviz.decode: dynamic, static, compiled; None: `decode.default_mode`, compiled on
        a GPU, dynamic on a CPU)."""
        self.validate(input_ids.shape[-1], settings, sampling, mode)
        from .decode import check_mode

        check_mode(decode)
        return Run(self, input_ids, settings, sampling, mode, interrupt, decode)

    @contextlib.contextmanager
    def interruptible(self, interrupt: threading.Event | None) -> Iterator[None]:
        """While the block runs, a set `interrupt` raises Interrupted between two layers. One step runs on the
        engine at a time (the device lock), so the engine holds the event of the step under way."""
        self._interrupt = interrupt
        try:
            yield
        finally:
            self._interrupt = None

    def generate(self, prompt: str, settings: MergeSettings = MergeSettings(), sampling: Sampling = Sampling(),
                 mode: str = "cached", chat: bool = True) -> Trace:
        """Run to the end and return the trace."""
        run = self.start(self.encode(prompt, chat), settings, sampling, mode)
        for _ in run:
            pass
        return run.trace

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One short forward pass, so the first timed run is not charged for one-time setup (kernels, allocator)."""
        ids = torch.zeros(1, 8, dtype=torch.long, device=self.device)
        self.prefill(ids, MergeSettings(cutoffs=(self.num_layers // 2,))).decode(0)
        self.sync()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class Session:
    """A prompt the engine has run: its per-layer KV caches (shorter after each cutoff), the layout the merge left,
    the stages that actually ran, and the next-token logits. `decode` feeds generated tokens one step at a time."""

    def __init__(self, engine: MergingEngine, cache, layout: Layout, cosines: list[torch.Tensor], length: int,
                 logits: torch.Tensor):
        self.engine, self.cache, self.layout, self.cosines = engine, cache, layout, cosines
        self.length = length  # original tokens fed so far: the next one sits at this position
        self.logits = logits  # [1, vocab]: the next token's

    @property
    def stages(self) -> list[Stage]:
        return self.layout.stages

    @torch.inference_mode()
    def decode(self, token: int | torch.Tensor) -> torch.Tensor:
        """Feed one token (or [1, n] tokens) through every layer's cache; the next token's logits [1, vocab]."""
        if self.cache is None:
            raise ValueError("this session was prefilled without a cache; re-run the prompt to go on")
        ids = torch.as_tensor(token, device=self.engine.device).reshape(1, -1)
        h = self.engine._forward_new(self.engine.decoder.embed_tokens(ids), self.length, self.layout, self.cache)
        self.length += ids.shape[1]
        self.logits = self.engine._logits(h)
        return self.logits

    def static_decoder(self, max_new_tokens: int, compiled: bool = False):
        """A static decoder (slerpviz.decode) continuing this session: the same tokens as `decode`, on fixed-size
        buffers, nothing made on the host per step. It copies the cache: this session does not advance with it."""
        from .decode import acquire

        return acquire(self, max_new_tokens, compiled)

    def kv_lengths(self) -> list[int]:
        """Tokens (slots) each layer's cache holds."""
        return cache_lengths(self.cache) if self.cache is not None else []

    def kv_bytes(self) -> list[int]:
        return kv_bytes_per_layer(self.cache) if self.cache is not None else []


class Run:
    """One generation. Iterate it to get a Step per token; `trace` fills in as it goes.

    Each step is timed on its own (synchronised on a GPU), so two runs can be interleaved step by step and
    neither is charged for the other.
    """

    def __init__(self, engine: MergingEngine, input_ids, settings: MergeSettings, sampling: Sampling, mode: str,
                 interrupt: threading.Event | None = None, decode: str | None = None):
        # decode: "dynamic", "static" or "compiled"; None: slerpviz.decode.default_mode (compiled on a GPU)
        self.decode, self.static = decode, None  # the static decoder while the run decodes static
        self.engine, self.input_ids, self.settings = engine, input_ids, settings
        self.sampling, self.mode, self.interrupt = sampling, mode, interrupt
        self.trace = engine.new_trace(input_ids, settings, mode, preview=False)  # filled by the prefill's session
        self.session: Session | None = None  # the prompt's session, from the first step on
        self._steps = self._generate()

    def __iter__(self) -> Iterator[Step]:
        # The run itself, not its generator: a `for` loop then goes through __next__, which arms the interrupt.
        return self

    def __next__(self) -> Step:
        with self.engine.interruptible(self.interrupt):
            return next(self._steps)

    def close(self) -> None:
        self._steps.close()

    def _generate(self) -> Iterator[Step]:
        try:
            yield from self._tokens()
        finally:
            if self.static is not None:  # back to the engine's pool, for the next run of the same shapes
                self.static.release()
                self.static = None

    def _start_decoding(self) -> None:
        """Choose the decode (slerpviz.decode) after the prefill: the static decoder where asked for and exact, its
        warm-up (compiling and capturing on first use) recorded on its own, never in a step's time."""
        from .decode import start_decoding

        self.static, self.trace.decode, self.trace.decode_warmup_s = start_decoding(
            self.session, self.sampling.max_new_tokens - 1, self.decode)

    def _tokens(self) -> Iterator[Step]:
        engine, trace, sampling = self.engine, self.trace, self.sampling
        generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
        warp = _warpers(sampling)
        ids = self.input_ids
        emitted = ""
        for step in range(sampling.max_new_tokens):
            if step == 1 and self.mode == "cached":
                self._start_decoding()  # builds (and compiles) the static decoder, timed on its own
            engine.sync()
            began = time.perf_counter()
            if step == 0 or self.mode == "recompute":
                # recompute is the article's semantics: no cache, re-plan and re-merge the whole sequence every step.
                session = engine.prefill(ids, self.settings, cached=self.mode == "cached")
                logits = session.logits
                if step == 0:
                    self.session = session
            elif self.static is not None:
                logits = self.static.step(next_id)
            else:
                logits = self.session.decode(ids[:, -1:])
            if warp is None:
                next_id = logits.argmax(-1, keepdim=True)  # [1, 1], stays on the device for the next step
                token = int(next_id)  # the step's one sync: the token's text is shown now
            else:
                token = _choose(logits, ids, warp, generator)
                next_id = torch.tensor([[token]], device=ids.device)
            engine.sync()
            seconds = time.perf_counter() - began

            if step == 0:
                trace.prefill_s = seconds
                record_session(trace, self.session)
            else:
                trace.decode_s.append(seconds)
            if self.static is not None:
                trace.kv_bytes_per_layer = self.static.kv_bytes()  # what the dynamic cache would hold
            elif self.session.cache is not None:
                trace.kv_bytes_per_layer = self.session.kv_bytes()
            trace.generated_ids.append(token)
            ids = torch.cat([ids, next_id.to(ids.device)], dim=1)
            text = engine.tokenizer.decode(trace.generated_ids, skip_special_tokens=True)
            piece = ""
            if not text.endswith("\ufffd"):  # hold back a partial multi-byte character
                piece, emitted = text[len(emitted):], text
                trace.text = text
            yield Step(token, piece, seconds)
            if token in engine.eos_ids:
                break
        trace.text = engine.tokenizer.decode(trace.generated_ids, skip_special_tokens=True)
        trace.finished = True


class MergingForward:
    """A decoder's forward (`model.model.forward`) that merges, in the signature transformers calls it with: what
    `slerpviz.merging` puts on a model so that its own `generate`, pipelines and harnesses merge.

    A prompt fed with an empty cache (or none) runs the engine's merging forward; tokens fed with a cache that this
    forward filled continue it, each layer after its own shorter sequence. The output has one hidden state per input
    token: after a merge each token gets its final slot's (ToMe's "unmerge"). Only rows that depend on no later
    token may be read (`rows`, the caller's logits_to_keep, which the patch passes on): the last one, what `generate`
    reads, always; a row whose slot also holds the token it predicts never, nor any row but the last when the pairs
    were chosen from the whole sequence. Asking for another is refused (see `_check_rows`).
    """

    def __init__(self, engine: MergingEngine, settings: MergeSettings):
        # Everything but the prompt's length can be checked now; the spans are checked against each prompt.
        engine.validate(settings.keep_start + settings.keep_end + 2, settings)
        self.engine, self.settings = engine, settings
        self._layouts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> CacheEntry
        self.previous = None  # a forward set on the decoder instance before the patch (slerpviz.patch)
        self.previous_generate = None  # likewise, a generate set on the model instance
        self.was_training = False  # the model's mode before the patch
        self.previous_model_forward = None  # a forward set on the model instance before the patch
        # The rows the caller will read, as transformers' logits_to_keep (0: all, k: the last k, or positions); the
        # patch sets it around each call of the model's forward. Called on its own, the decoder is read whole.
        self.rows: int | torch.Tensor = 0

    @contextlib.contextmanager
    def reading(self, rows: int | torch.Tensor) -> Iterator[None]:
        """While the block runs, calls read only these rows (transformers' logits_to_keep)."""
        previous, self.rows = self.rows, rows
        try:
            yield
        finally:
            self.rows = previous

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                 use_cache=None, past_key_values=None, **kwargs) -> BaseModelOutputWithPast:
        engine = self.engine
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            raise ValueError("slerpviz's merging forward does not return per-layer attentions or hidden states")
        h = engine.decoder.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if h.shape[0] != 1:
            raise ValueError(
                f"slerpviz merges one sequence at a time, not a batch of {h.shape[0]} (several prompts, beams or "
                "num_return_sequences > 1): the pairs, the positions and the cache lengths are planned per sequence; "
                "run one prompt at a time, greedy or sampled (pipeline batch_size=1)"
            )
        if attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all()):
            raise ValueError("slerpviz's merging forward does not take padding: give a prompt without padded tokens")
        use_cache = engine.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=engine.config)
        continuing = cache is not None and cache.get_seq_length() > 0
        entry = self._layouts.get(cache) if continuing else None
        if continuing and entry is None:
            raise ValueError("this cache was not filled by this merging forward (the plain model or another `merging` "
                             "block filled it); start from an empty cache")
        # The forward counts the tokens itself; a caller that counts otherwise (generate continuing a cache whose
        # layer 0 merged, assisted or prompt-lookup decoding that crops the cache back) would get wrong tokens.
        start = entry.position if entry is not None else 0
        self._check_caller_agrees(cache, entry, start, h.shape[1], attention_mask, position_ids)
        if entry is not None:
            hidden = engine._forward_new(h, start, entry.layout, cache)
        else:
            engine.validate(h.shape[1], self.settings)
            hidden, layout, _ = engine._forward_prompt(h, self.settings, cache)
            self._check_rows(layout, h.shape[1])
            if layout.stages:  # one row per original token again: each gets its final slot's
                hidden = hidden.repeat_interleave(layout.stages[-1].sizes.to(hidden.device), dim=1)
            if cache is not None:
                entry = self._layouts[cache] = CacheEntry(layout)
        if entry is not None:
            entry.position = start + h.shape[1]
            entry.lengths = cache_lengths(cache)
        return BaseModelOutputWithPast(last_hidden_state=engine.decoder.norm(hidden),
                                       cache=cache if use_cache else None)

    def honest_rows(self, layout: Layout, length: int) -> tuple[torch.Tensor, str]:
        """Which rows of a sequence fed whole [length] depend on no later token (bool), and why the others do.

        Slot s attends to slots up to s, which hold original tokens up to its last one, so a token that ends its slot
        is honest when the plan is fixed by positions alone (`consecutive`, `uniform`, a per-vector interpolation).
        `similar` and `attention` choose the pairs from every token's hidden state (the attention of the last ones),
        and seed-2024 divides by the norm of the whole sequence: then only the last row, which sees every token.
        """
        honest = torch.ones(length, dtype=torch.bool)
        if not layout.stages or not bool((layout.stages[-1].sizes > 1).any()):
            return honest, ""  # nothing merged: the model's own rows
        honest[:-1] = False
        if self.settings.choice in PLANNED_AT_CUTOFF or self.settings.method == "seed-2024":
            why = ("was merged by the seed-2024 method, which divides by the whole sequence"
                   if self.settings.method == "seed-2024" else
                   f"depends on which pairs the {self.settings.choice!r} choice took from the whole sequence")
            return honest, why
        honest[layout.stages[-1].last.cpu()] = True
        return honest, "shares a merged slot with the token it predicts"

    def _check_rows(self, layout: Layout, length: int) -> None:
        """Refuse a sequence fed whole whose caller would read a row that depends on a later token."""
        from transformers.modeling_utils import slice_logits_to_keep

        honest, why = self.honest_rows(layout, length)
        rows = self.rows.cpu() if isinstance(self.rows, torch.Tensor) else self.rows
        wanted = slice_logits_to_keep(torch.arange(length).view(1, length, 1), rows).reshape(-1)
        unfair = wanted[~honest[wanted]]
        if unfair.numel():
            raise ValueError(
                f"under merging, {unfair.numel()} of the {wanted.numel()} rows asked for would depend on a later token "
                f"(row {int(unfair[0])} {why}; logits_to_keep=0, the default, asks for every row), so per-token "
                "log-likelihoods are refused (lm-eval's loglikelihood, multiple-choice and perplexity tasks); "
                "generation reads only the last row, which is exact: generate, pipelines and generate_until tasks "
                "run, and so does a forward with logits_to_keep=1"
            )

    @staticmethod
    def _check_caller_agrees(cache, entry: CacheEntry | None, start: int, new: int, attention_mask, position_ids
                             ) -> None:
        """Refuse a call whose cache, mask or positions do not continue the tokens this forward has seen."""
        if entry is not None and cache_lengths(cache) != entry.lengths:
            raise ValueError("the merged cache was changed outside slerpviz's merging (cropped or rolled back, as "
                             "assisted and prompt-lookup generation do): they are not supported while merging")
        claimed = []  # where the caller thinks these tokens start, and what says so
        if attention_mask is not None and attention_mask.ndim == 2:
            covered = attention_mask.shape[-1]
            claimed.append((covered - new, f"its attention mask covers {covered} tokens for the {new} fed"))
        if position_ids is not None:
            first = int(position_ids.reshape(-1)[0])
            claimed.append((first, f"its position_ids start at {first}"))
        wrong = [(where, said) for where, said in claimed if where != start]
        if wrong and entry is None:  # a fresh forward: there is no cache to continue, the sequence starts here
            raise ValueError(
                f"this forward starts a new sequence under merging (no merged cache before it), but {wrong[0][1]}: "
                "a sequence fed without a merged cache starts at position 0 (merged slots get their own "
                "positions); give position_ids from 0, or none, and an attention mask as long as the tokens fed"
            )
        if wrong:
            raise ValueError(
                f"this call continues the merged cache from token {wrong[0][0]}, but it holds {start} tokens: continue "
                "a merged cache only within the `merging` block that filled it, and only by the tokens it has not "
                "seen (generate counts a cache by its first layer, which a cutoff at layer 0 shortens)"
            )
        if position_ids is not None:
            expected = torch.arange(start, start + new, device=position_ids.device)
            if not torch.equal(position_ids.reshape(-1, new), expected.expand(position_ids.numel() // new, new)):
                raise ValueError("slerpviz's merging forward places the tokens itself (merged slots get their own "
                                 "positions): position_ids other than the running count are not supported")


@dataclass
class CacheEntry:
    """What a merging forward keeps beside each cache it filled: the prompt's layout, the next token's position and
    each layer's length after its last call (to notice a cache changed behind its back)."""

    layout: Layout
    position: int = 0
    lengths: list[int] = field(default_factory=list)


def cache_lengths(cache) -> list[int]:
    """Tokens (slots) each layer of a transformers cache holds."""
    return [layer.get_seq_length() for layer in cache.layers]


def interleave(*runs: Run, lock=None) -> Iterator[tuple[Step | None, ...]]:
    """Advance the runs one step each in turn until all are done; a finished run contributes None.

    Each step is timed inside its run, so neither is charged for the other. `lock` (held around each step) keeps
    one step at a time on a shared device. Closing this iterator (Stop, or a client that went away) closes all runs.
    """
    lock = lock if lock is not None else contextlib.nullcontext()
    active = list(runs)
    try:
        while any(run is not None for run in active):
            steps = []
            for index, run in enumerate(active):
                step = None
                if run is not None:
                    with lock:
                        step = next(run, None)
                    if step is None:
                        active[index] = None
                steps.append(step)
            if any(step is not None for step in steps):
                yield tuple(steps)
    finally:
        for run in runs:
            run.close()


@dataclass(frozen=True)
class Merged:
    """The hidden states after a cutoff's merge, with what the layers after it need to know."""

    hidden: torch.Tensor  # [1, slots, d]
    stage: Stage
    cosines: torch.Tensor  # [1, slots]: cosine of each slot's two members before merging (0 for a single)
    positions: torch.Tensor  # [slots]: RoPE positions of the slots
    log_sizes: torch.Tensor | None  # log(tokens per slot) for proportional attention, when any slot holds several
    attention: torch.Tensor | None = None  # [items]: attention received, when the `attention` choice planned the stage


def record_session(trace: Trace, session: Session) -> None:
    """Write what the prompt's prefill did into the trace: the stages that ran, pair cosines, attention scores."""
    record_plan(trace, session.stages)
    trace.pair_cosines = [[c for c, size in zip(cosines.flatten().tolist(), stage.plan.sizes.tolist()) if size == 2]
                          for cosines, stage in zip(session.cosines, session.stages)]
    trace.attention_scores = [a.tolist() if a is not None else [] for a in session.layout.attention]


def record_plan(trace: Trace, stages: list[Stage]) -> None:
    """Write the merge stages into the trace: slots as original positions, protection, sizes, length per layer."""
    trace.groups = [[list(g) for g in stage.groups] for stage in stages]
    trace.protected = [stage.plan.protected.tolist() for stage in stages]
    trace.slot_sizes = [stage.sizes.tolist() for stage in stages]
    trace.cutoffs = [stage.cutoff for stage in stages]
    trace.seq_len_per_layer = layer_lengths(trace.prompt_length, stages, trace.num_layers)
    trace.plan_pending = False


def _add_key_bias(mask: torch.Tensor, log_sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive float mask [.., q, kv] from a bool or float causal mask, plus log(size) of each key.

    Keys past the merged slots (tokens fed after the prefill) hold one token each: bias 0.
    """
    kv = mask.shape[-1]
    bias = torch.zeros(kv, dtype=torch.float32, device=mask.device)
    bias[: log_sizes.numel()] = log_sizes.to(mask.device)
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask + bias.to(dtype)


def kv_bytes_per_layer(cache) -> list[int]:
    sizes = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        sizes.append(sum(t.numel() * t.element_size() for t in (keys, values) if t is not None))
    return sizes


def _choose(logits: torch.Tensor, ids: torch.Tensor, warp, generator: torch.Generator) -> int:
    if warp is None:
        return int(logits.argmax(-1))
    probs = torch.softmax(warp(ids, logits), dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


def _warpers(sampling: Sampling) -> LogitsProcessorList | None:
    if sampling.temperature == 0:
        return None
    warpers = LogitsProcessorList([TemperatureLogitsWarper(sampling.temperature)])
    if sampling.top_p < 1:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return warpers


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    return ids


def _is_sliding(config, layer: int) -> bool:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[layer] == "sliding_attention"
    return getattr(config, "sliding_window", None) is not None
