"""The model run layer by layer, merging tokens at the cutoffs: the one merging forward.

With slerpviz.patch, which calls it, this is where transformers internals are known. It reads top to bottom, as the
model runs: embed -> [layers on the full sequence] -> merge -> [layers on the merged sequence] -> ... -> norm ->
lm_head. Each layer keeps its own KV cache, so layers after a cutoff hold a shorter cache; new tokens go through every
layer at the position they have in that layer's sequence.

One merging forward (`forward_prompt`, `forward_new`) serves three callers: `prefill` returns a Session (the caches,
the stages that ran, `decode`), slerpviz.generation's `Run` generates step by step from a session, and
slerpviz.patch's `MergingForward` stands in for a model's own decoder forward. slerpviz.engine's `MergingEngine` is
this class with a tokenizer and generation on top.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

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

from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .layers import OneLayerCache, add_key_bias, cache_layer, call_layer, compiling, is_sliding
from .merge import INTERPOLATE, adjacent_cosines, cosine, gather_pairs, ratio_per_stage, slerp_and_cosine
from .pairs import Stage, check_spans, last_slot_offset, next_stage, slot_positions
from .session import Session, cache_lengths, kv_bytes_per_layer  # noqa: F401  (the forward's names too)
from .settings import (
    MergeSettings, Sampling, attention_budget, check_choice, check_method, check_mode, check_positions, check_prefill,
    check_sampling, real,
)

SUPPORTED_FAMILIES = ("mistral", "llama", "qwen2")


class Interrupted(Exception):
    """A step stopped between two layers because its run's interrupt was set (the page's Stop)."""


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


@dataclass(frozen=True)
class Merged:
    """The hidden states after a cutoff's merge, with what the layers after it need to know."""

    hidden: torch.Tensor  # [1, slots, d]
    stage: Stage
    cosines: torch.Tensor  # [1, slots]: cosine of each slot's two members before merging (0 for a single)
    positions: torch.Tensor  # [slots]: RoPE positions of the slots
    log_sizes: torch.Tensor | None  # log(tokens per slot) under proportional attention (all 0 where nothing merged)
    attention: torch.Tensor | None = None  # [items]: attention received, when the `attention` choice planned the stage


def check_supported(model) -> None:
    family = getattr(model.config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"model family {family!r} is not supported; slerpviz runs {', '.join(SUPPORTED_FAMILIES)} decoders"
        )


class LayerwiseModel:
    """A supported causal LM run layer by layer with per-layer caches, merging at the cutoffs of its settings; its
    tokenizer (None under the patch, which is handed token ids) turns tokens back into text."""

    def __init__(self, model, tokenizer=None):
        check_supported(model)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.decoder = model.model  # embed_tokens, layers, rotary_emb, norm
        self.num_layers = self.config.num_hidden_layers
        self.eos_ids = _eos_ids(model, tokenizer)  # a generation (slerpviz.generation) stops at these
        self._interrupt = None  # an Event the step under way checks between layers (see `interruptible`)
        # The prompt's layers, and the merges between them, through torch.compile once `compile_prefill` is called.
        self._prefill_layer = self._prefill_merge = None

    def compile_prefill(self, backend: str = "inductor", mode: str | None = None, merges: bool = True,
                        fullgraph: bool = False) -> None:
        """From now on the prompt's layers, and with `merges` the merges between them, run through `torch.compile`
        (new tokens keep their decode path).

        Regional compilation: the decoder layer is compiled, not the model, with dynamic shapes, and each layer is
        handed its own cache layer (`OneLayerCache`), so nothing the trace reads differs between layers: one graph
        serves every layer, prompt length and merged length (a few more: with and without a cache, a bool and a
        float mask). A merge is a graph or two per cutoff and setting (an even and an odd count of pairs), its count
        of slots read inside it, for every length. The compile happens on the first prompt of each kind;
        `warm_up_prefill` pays it ahead. Settings met for the first time compile then: the app, which meets any,
        compiles the layers alone. `fullgraph`: raise where a graph would break or COMPILE_CONFIG's count of graphs
        runs out (the tests prove there is no break with it); without, such a call runs eagerly.
        """
        options = dict(dynamic=True, fullgraph=fullgraph, backend=backend, mode=mode)
        self._prefill_layer = torch.compile(call_layer, **options)
        self._prefill_merge = torch.compile(self.merge_at_cutoff, **options) if merges else None

    def uncompile_prefill(self) -> None:
        """The prompt's layers and merges eager again (after a compile that failed, say)."""
        self._prefill_layer = self._prefill_merge = None

    @property
    def compiled_prefill(self) -> bool:
        return self._prefill_layer is not None

    @contextlib.contextmanager
    def prefill_path(self, prefill: str) -> Iterator[None]:
        """The prompt's layers as `prefill` (settings.PREFILLS) says while the block runs: eager, or compiled after
        `compile_prefill` (the speed benchmark times both paths in one run)."""
        if check_prefill(prefill) == "compiled" and not self.compiled_prefill:
            raise ValueError("the prefill is not compiled: call compile_prefill() first")
        compiled = self._prefill_layer, self._prefill_merge
        if prefill == "eager":
            self._prefill_layer = self._prefill_merge = None
        try:
            yield
        finally:
            self._prefill_layer, self._prefill_merge = compiled

    @torch.inference_mode()
    def warm_up_prefill(self, settings: Iterable[MergeSettings] = (MergeSettings(),)) -> float:
        """Seconds to compile the prefill (after `compile_prefill`) for the prompts these settings make: one prompt
        each, long enough that every cutoff merges, so no timed run is charged for a compile."""
        if not self.compiled_prefill:
            return 0.0
        began = time.perf_counter()
        for merge in settings:
            # Lengths unlike any of the model's own sizes: torch.compile's dynamic shapes would otherwise take a prompt
            # as long as, say, a head's width for one symbol, and compile again for the next prompt. Two of them, as
            # a merge compiles once for an even count of pairs and once for an odd one.
            for extra in (97, 98):
                length = 2 * merge.most_protected + extra
                self.prefill(torch.full((1, length), 3, device=self.device), merge)
        self.sync()
        return time.perf_counter() - began

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

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
        if settings.proportional and settings.method == "drop":
            raise ValueError("proportional attention weighs a slot by the tokens it holds, and a dropped pair keeps "
                             "one: use it with a merge method, not drop")
        if settings.proportional and any(is_sliding(self.config, i) for i in range(self.num_layers)):
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

    # -----------------------------------------------------------------------------------------------------------
    # The prompt: embed -> layers -> merge -> layers -> ... -> norm -> lm_head
    # -----------------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, settings: MergeSettings = MergeSettings(), cached: bool = True,
                stages: list[Stage] | None = None) -> "Session":
        """Run the prompt [1, L], merging at each cutoff, into a fresh per-layer cache (none when not `cached`).

        `stages` replays a plan instead of planning (a one-pass reference for cached decoding, in the tests).
        """
        self.validate(input_ids.shape[-1], settings)
        cache = DynamicCache(config=self.config) if cached else None
        h, layout, cosines = self.forward_prompt(self.decoder.embed_tokens(input_ids), settings, cache, stages)
        return Session(self, cache, layout, cosines, input_ids.shape[-1], self.head(h))

    @torch.inference_mode()
    def merge_only(self, h: torch.Tensor, settings: MergeSettings) -> Layout:
        """Everything a prefill of hidden states h [1, L, d] does at its cutoffs (the attention choice's scoring
        included) and nothing else: the layers between them are skipped, so h reaches every cutoff as it is."""
        self.validate(h.shape[1], settings)
        return self.forward_prompt(h, settings, run_layers=False)[1]

    def forward_prompt(
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
        # Two tensors, not one twice: a compiled merge guards on whether its inputs are the same tensor.
        first, last = torch.arange(length, device=h.device), torch.arange(length, device=h.device)
        log_sizes, offset = None, 0
        segments, realised, cosines, scores, start = [], [], [], [], 0
        merge = self.merge_at_cutoff if self._prefill_merge is None or stages is not None else self._prefill_merge
        # Dynamo's settings for a compiled prefill, set once a prompt (a patch of them costs some 20 µs).
        with compiling(self.compiled_prefill):
            for index, cutoff in enumerate([*cutoffs, None]):
                end = self.num_layers if cutoff is None else cutoff
                if end > start:
                    if run_layers:
                        h = self._run_layers(h, start, end, positions, cache, log_sizes, self._prefill_layer)
                    segments.append(_Segment(start, end, offset, log_sizes))
                    start = end
                if cutoff is None:
                    break
                merged = merge(h, first, last, positions, log_sizes, cutoff, settings,
                               ratios[index] if stages is None else 1.0, stages[index] if stages is not None else None,
                               settings.kept_budget(length), settings.protected_end(length))
                several = merged.stage.plan.merged_length < length  # some slot holds several tokens
                h, positions, log_sizes = merged.hidden, merged.positions, merged.log_sizes if several else None
                offset = last_slot_offset(length, merged.stage.plan.merged_length, settings.positions)
                first, last = merged.stage.first, merged.stage.last
                cosines.append(merged.cosines)
                realised.append(merged.stage)
                scores.append(merged.attention)
        return h, Layout(segments, realised, scores), cosines

    def _run_layers(
        self, h: torch.Tensor, start: int, end: int, positions: torch.Tensor, cache,
        log_sizes: torch.Tensor | None = None, compiled=None, attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Layers [start, end) on h [1, L, d]; positions [L] go only into RoPE, never into the mask builders.

        With `log_sizes`, the attention logit of each cached or current key that stands for several tokens is
        raised by log(tokens), through an additive float mask (works with sdpa and eager alike). `compiled`: the
        compiled `call_layer` of `compile_prefill`, which writes each layer's cache through its own layer. A batch
        (slerpviz.batch) gives h [B, n, d], positions [B, n], log_sizes [B, slots] and a 2-D `attention_mask` of the
        keys each row may see (its padding hidden).
        """
        positions = positions if positions.ndim == 2 else positions[None]
        position_embeddings = self.decoder.rotary_emb(h, positions.to(h.device))
        # One mask per attention type, all built before any layer of the segment writes its cache, each sized
        # against the cache of the segment's first layer of that type (as transformers builds them per forward).
        first_of_type: dict[bool, int] = {}
        for index in range(start, end):
            first_of_type.setdefault(is_sliding(self.config, index), index)
        masks = {}
        for sliding, layer_idx in first_of_type.items():
            build = create_sliding_window_causal_mask if sliding else create_causal_mask
            # position_ids=None: merged positions do not step by 1 and would read as packed sequences.
            masks[sliding] = build(
                config=self.config, inputs_embeds=h, attention_mask=attention_mask, cache=cache, position_ids=None,
                layer_idx=layer_idx, allow_is_causal_skip=log_sizes is None and attention_mask is None,
            )  # a batch's mask always goes in whole: checking whether it could be skipped reads the device
            if log_sizes is not None:
                masks[sliding] = add_key_bias(masks[sliding], log_sizes, h.dtype)
        for index in range(start, end):
            if self._interrupt is not None and self._interrupt.is_set():
                raise Interrupted("the run was stopped")
            mask = masks[is_sliding(self.config, index)]
            if compiled is None:
                h = call_layer(self.decoder.layers[index], h, mask, cache, position_embeddings)
            else:
                layer_cache = None if cache is None else OneLayerCache(cache_layer(cache, index))
                h = compiled(self.decoder.layers[index], h, mask, layer_cache, position_embeddings)
        return h

    def embedded(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The embeddings of `input_ids`, or `inputs_embeds` as they are where a caller gives them instead."""
        return self.decoder.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm and the LM head on the last position only, as generate() computes them: the next token's
        logits [1, vocab]."""
        return self.model.lm_head(self.decoder.norm(h[:, -1:]))[:, -1].float()

    # -----------------------------------------------------------------------------------------------------------
    # The merge at a cutoff
    # -----------------------------------------------------------------------------------------------------------

    def merge_at_cutoff(
        self, h: torch.Tensor, first: torch.Tensor, last: torch.Tensor, positions: torch.Tensor,
        log_sizes: torch.Tensor | None, cutoff: int, settings: MergeSettings, ratio: float, stage: Stage | None = None,
        kept: int | None = None, keep_end: int | None = None,
    ) -> "Merged":
        """Everything a prefill does at a cutoff besides running layers: plan the stage (from h for `similar` and
        `attention`) unless one is replayed, the pair cosines, the interpolation, the slots' positions and sizes.

        On the device throughout: the plan reads one number back (the slots' count) only where the choice cannot
        know it ahead, `similar` and the attention choice's kept budget. `kept`: that budget, for the prompt's
        length (settings.kept_budget; reckoned by the caller, as a compiled merge would compile again for every
        length it rounded a share of). `keep_end`: the protected end for the prompt's length (settings.protected_end,
        the same count of slots at every stage), reckoned by the caller alike."""
        kept = settings.kept_budget(first.numel()) if kept is None else kept
        keep_end = settings.protected_end(first.numel()) if keep_end is None else keep_end
        attention = None
        if stage is None:
            mixed = settings.choice == "attention" and settings.cosine_share > 0
            similarity = adjacent_cosines(h)[0] if settings.choice == "similar" or mixed else None
            if settings.choice == "attention":
                attention = self.attention_received(cutoff, h, positions, settings.attention_window, log_sizes)
            stage = next_stage(first, last, cutoff, settings.keep_start, keep_end, ratio, settings.choice,
                               similarity, settings.size_weighted, attention, kept,
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
        # The caller drops them where no slot holds several (a comparison with the slots' count, which a compiled
        # merge knows only once it has run).
        log_sizes = stage.sizes.float().log() if settings.proportional else None
        # Each slot's two members' cosine (0 for a single, whose partner is the zero row); the trace keeps the pairs'.
        return Merged(hidden, stage, cosines, slots, log_sizes, attention)

    def attention_received(
        self, cutoff: int, h: torch.Tensor, positions: torch.Tensor, window: int,
        log_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention each of the L items of h [1, L, d] receives from the last `window` items, at the layer after
        the cutoff: [L], averaged over heads and queries.

        The layer's own input norm, q/k projections, RoPE at the items' positions (on h's device, as the prefill keeps
        them) and grouped KV heads, causal, with proportional attention's log(size) when it is on; W queries against L
        keys, never the whole L × L matrix.
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
        positions = torch.arange(input_ids.shape[-1], device=self.device)  # where attention_received reads them
        # hidden[c] is what enters layer c: the embeddings, then each layer's output.
        return torch.stack([self.attention_received(c, hidden[c], positions, window)
                            for c in range(self.num_layers)]).cpu()

    # -----------------------------------------------------------------------------------------------------------
    # New tokens, after the prompt
    # -----------------------------------------------------------------------------------------------------------

    def forward_new(self, h: torch.Tensor, position: int, layout: Layout, cache) -> torch.Tensor:
        """New tokens' embeddings h [1, n, d], the first at original position `position`, through every layer's
        cache; each layer places them after its own (possibly merged) sequence."""
        new = torch.arange(h.shape[1], dtype=torch.float32, device=h.device) + position  # no host tensor per step
        for segment in layout.segments:
            h = self._run_layers(h, segment.start, segment.end, new + segment.offset, cache, segment.log_sizes)
        return h

    @contextlib.contextmanager
    def interruptible(self, interrupt: threading.Event | None) -> Iterator[None]:
        """While the block runs, a set `interrupt` raises Interrupted between two layers. One step runs on the
        engine at a time (the device lock), so the engine holds the event of the step under way."""
        self._interrupt = interrupt
        try:
            yield
        finally:
            self._interrupt = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    return ids
