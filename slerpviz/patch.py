"""Merging on any supported transformers model, under its own forward: `generate`, pipelines, evaluation harnesses.

    with slerpviz.merging(model, MergeSettings(cutoffs=(15,))):
        model.generate(**inputs)

The patch puts a merging forward (`MergingForward`, below: the decoder's forward signature around slerpviz.forward's
one merging forward, the same the engine runs) in place of the decoder's forward and takes it off again, as ToMe's
and tomesd's patches and kvpress's presses do; the model's weights are never touched. A batch, padded on the left,
is merged row by row and decoded together (slerpviz.batch); a static cache's new tokens run on slerpviz.decode's
static decoder (slerpviz.static_run).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, StaticCache
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

from . import batch as batches
from .decode import check_mode, clear, default_mode, start_decoding
from .forward import LayerwiseModel, Layout, cache_lengths
from .merge import PLANNED_AT_CUTOFF
from .session import Session
from .static_run import StaticRun, static_capacity
from .settings import MergeSettings


def apply(model, settings: MergeSettings, compile_prefill: bool = False, decode: str | None = None
          ) -> MergingForward:
    """Make `model` (a Mistral, Llama or Qwen2 causal LM) merge in its own forward until `remove(model)`.

    `compile_prefill`: the prompt's layers and merges run through torch.compile (LayerwiseModel.compile_prefill; the
    first prompt pays the compile). `decode`: how new tokens run when generate is given a static cache
    (`cache_implementation="static"`), one of slerpviz.decode's paths; None: a CUDA graph on a GPU (static on ZeroGPU
    and on a CPU). With generate's own dynamic cache new tokens always take the dynamic path."""
    decode_mode = _static_mode(decode, model.device)
    decoder = model.model
    if isinstance(decoder.__dict__.get("forward"), MergingForward):
        raise ValueError("this model is already merging: remove the patch (or leave its `with` block) first")
    was_training = model.training  # the engine puts the model in eval mode; remove() gives the mode back
    engine = LayerwiseModel(model)
    if compile_prefill:
        engine.compile_prefill()
    forward = MergingForward(engine, settings, decode_mode)
    forward.was_training = was_training
    # A forward already set on the instance (accelerate's hooks put one there) comes back on remove.
    forward.previous = decoder.__dict__.get("forward")
    decoder.forward = forward
    forward.previous_generate = model.__dict__.get("generate")
    model.generate = _guarded_generate(model.generate)
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


def _static_mode(mode: str | None, device: torch.device) -> str:
    """The decode path a static cache asks for: the one given, else the engine's default on a GPU (a CUDA graph;
    static on ZeroGPU) and static where the default is dynamic (a CPU), since a static cache was asked for."""
    check_mode(mode)
    if mode is not None:
        return mode
    default = default_mode(device)
    return "static" if default == "dynamic" else default


def _guarded_generate(generate):
    """The model's generate, refusing what would merge the wrong tokens and keeping its auto-compile off."""

    @functools.wraps(generate)
    def merging_generate(*args, **kwargs):
        config = kwargs.get("generation_config") or getattr(generate.__self__, "generation_config", None)
        asked = [name for name in DRAFTING if kwargs.get(name, getattr(config, name, None)) not in (None, False)]
        if asked:
            raise ValueError(f"assisted and prompt-lookup generation ({', '.join(asked)}) are not supported while "
                             "merging: their draft tokens would be merged into the prompt")
        if kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None)) is not None:
            raise ValueError("chunked prefill (prefill_chunk_size) is not supported while merging: the prompt is "
                             "merged whole, and chunks after the first would continue it unmerged")
        # With a static cache on a GPU, generate compiles the model's forward; under merging that forward is the
        # merging one (Python that plans per prompt), and its static decoder records its own CUDA graph instead.
        kwargs.setdefault("disable_compile", True)
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
    forward.close()


def _restore(owner, name: str, previous) -> None:
    """Put back the instance attribute the patch replaced, or drop the patch's so the class's shows again."""
    if previous is not None:
        setattr(owner, name, previous)
    else:
        owner.__dict__.pop(name, None)


@contextlib.contextmanager
def merging(model, settings: MergeSettings, compile_prefill: bool = False, decode: str | None = None) -> Iterator:
    """`with merging(model, settings): ...` merges inside the block and always restores the model, on errors too."""
    apply(model, settings, compile_prefill, decode)
    try:
        yield model
    finally:
        remove(model)


class MergingForward:
    """A decoder's forward (`model.model.forward`) that merges, in the signature transformers calls it with: what
    `slerpviz.merging` puts on a model so that its own `generate`, pipelines and harnesses merge.

    A prompt fed with an empty cache (or none) runs the engine's merging forward; tokens fed with a cache that this
    forward filled continue it, each layer after its own shorter sequence. The output has one hidden state per input
    token: after a merge each token gets its final slot's (ToMe's "unmerge"). Only rows that depend on no later
    token may be read (`rows`, the caller's logits_to_keep, which the patch passes on): the last one, what `generate`
    reads, always; a row whose slot also holds the token it predicts never, nor any row but the last when the pairs
    were chosen from the whole sequence. Asking for another is refused (see `_check_rows`). A batch, or a prompt
    padded on the left, is merged row by row and decoded together (slerpviz.batch).

    A transformers StaticCache (`generate(..., cache_implementation="static")`, or one passed in) asks for static
    decoding: the prompt is merged into slerpviz's own per-layer cache and new tokens run through slerpviz.decode's
    static decoder (`decode`: on a GPU a CUDA graph), sized by the StaticCache's length. The StaticCache itself is
    never written, so transformers counts it empty and every generate call on it is a new prompt.
    """

    def __init__(self, engine: LayerwiseModel, settings: MergeSettings, decode: str = "static"):
        # Everything but the prompt's length can be checked now; the spans are checked against each prompt.
        engine.validate(settings.keep_start + settings.keep_end + 2, settings)
        self.engine, self.settings, self.decode = engine, settings, decode
        self._layouts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> CacheEntry
        self._static: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # StaticCache -> StaticRun
        # How the last prompt given a static cache decodes (as a trace names it: static, graph, compiled, or
        # dynamic with the reason), and the seconds its decoder took to set up (compiling and capturing included).
        self.decode_path, self.decode_warmup_s = "", 0.0
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
        batch = (input_ids if inputs_embeds is None else inputs_embeds).shape[0]
        if isinstance(cache, StaticCache):
            return self._static_call(input_ids, inputs_embeds, cache, attention_mask, position_ids)
        h = engine.embedded(input_ids, inputs_embeds)
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
        # A batch, or a prompt with padding (the mask read only where no batch cache says so: a read a step).
        several = batch != 1 or (entry is not None and entry.batch is not None) or batches.padded(attention_mask)
        self._check_caller_agrees(cache, entry, start, h.shape[1], attention_mask, None if several else position_ids)
        if entry is not None and entry.batch is not None:
            hidden = batches.forward_new(engine, h, start, entry.batch, cache, position_ids, attention_mask)
        elif entry is not None:
            if several:
                raise ValueError("this merged cache holds one sequence without padding: continue it the same way")
            hidden = engine.forward_new(h, start, entry.layout, cache)
        elif several:
            pads = batches.left_padding(attention_mask, batch, h.shape[1], h.device)
            hidden, stacked = batches.merge_prompts(self, h, cache, pads, position_ids)
            if cache is not None:
                entry = self._layouts[cache] = CacheEntry(None, batch=stacked)
        else:
            hidden, layout, _ = self._merged_prompt(h, cache)
            if cache is not None:
                entry = self._layouts[cache] = CacheEntry(layout)
        if entry is not None:
            entry.position = start + h.shape[1]
            entry.lengths = cache_lengths(cache)
        return BaseModelOutputWithPast(last_hidden_state=engine.decoder.norm(hidden),
                                       cache=cache if use_cache else None)

    def close(self) -> None:
        """Free the static decoders (their KV buffers) now, not when the static caches that a caller may still hold
        are dropped: the patch is being taken off."""
        for run in list(self._static.values()):
            run.close()
        self._static.clear()
        clear(self.engine)

    def _static_call(self, input_ids, inputs_embeds, cache: StaticCache, attention_mask, position_ids
                     ) -> BaseModelOutputWithPast:
        """A call with a StaticCache: a prompt (a new one whenever the caller starts at position 0) or one more token
        of the prompt this cache last held (its ids go to the static decoder as they are: no embedding here). A batch
        is merged row by row and decoded together (slerpviz.batch)."""
        if getattr(cache, "offloading", False):
            raise ValueError("an offloaded static cache (offloaded_static) is not supported while merging: slerpviz's "
                             "merged per-layer caches stay on the model's device; use cache_implementation='static'")
        run = self._static.get(cache)
        rows, new = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        several = rows != 1 or (run is not None and run.session.rows != 1)  # a batch (slerpviz.batch)
        start = None if several else _claimed_start(attention_mask, position_ids, new)
        _check_positions(None if several else position_ids, start or 0, new)
        if run is not None and new == 1 and (batches.continues(position_ids, run.session, run.position) if several
                                             else start in (None, run.position)):
            out = run.step(input_ids, inputs_embeds)
        elif start not in (None, 0):
            raise ValueError(
                f"under merging a static cache is continued one token at a time from where it stopped (token "
                f"{run.position if run else 0}), but this call feeds {new} from token {start}: a static cache holds "
                "one generation; start a new one from position 0"
            )
        else:
            if run is not None:  # forgotten before anything can fail: a released decoder must not be stepped again
                del self._static[cache]
                run.close()
            engine = self.engine
            capacity = static_capacity(cache)
            if capacity is not None and capacity <= new:
                raise ValueError(f"the static cache was made for {capacity} tokens, which leaves no room after the "
                                 f"prompt's {new}: give it a max_cache_len of the prompt plus the new tokens")
            ours, h = DynamicCache(config=engine.config), engine.embedded(input_ids, inputs_embeds)
            if several:
                hidden, session = batches.static_session(self, h, ours, attention_mask, position_ids)
            else:
                hidden, layout, cosines = self._merged_prompt(h, ours)
                session = Session(engine, ours, layout, cosines, new, logits=None)
            if capacity is None:
                decoder, path, seconds = None, "dynamic (a sliding-window static cache does not say its length)", 0.0
            else:
                decoder, path, seconds = start_decoding(session, capacity - new, self.decode, head=False)
            self._static[cache] = StaticRun(session, decoder, cache, capacity, new)
            self.decode_path, self.decode_warmup_s = path, seconds
            out = engine.decoder.norm(hidden)
        return BaseModelOutputWithPast(last_hidden_state=out, cache=cache)

    def _merged_prompt(self, h: torch.Tensor, cache, pad: int = 0) -> tuple[torch.Tensor, Layout, list[torch.Tensor]]:
        """A prompt's embeddings h [1, L, d] through the merging forward into `cache`: one row per original token
        (before the final norm), the layout and the pair cosines. The prompt is checked before it runs, the rows the
        caller will read once the layout says which are honest (`pad`: rows of padding the caller fed before it)."""
        self.engine.validate(h.shape[1], self.settings)
        hidden, layout, cosines = self.engine.forward_prompt(h, self.settings, cache)
        self._check_rows(layout, h.shape[1], pad)
        return _unmerged(hidden, layout), layout, cosines

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

    def _check_rows(self, layout: Layout, length: int, pad: int = 0) -> None:
        """Refuse a sequence fed whole whose caller would read a row that depends on a later token (rows of padding
        before it depend on nothing)."""
        honest, why = self.honest_rows(layout, length)
        honest = torch.cat([torch.ones(pad, dtype=torch.bool), honest])
        length += pad
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
        wrong = [(where, said) for where, said in _claims(attention_mask, position_ids, new) if where != start]
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
        _check_positions(position_ids, start, new)


def _unmerged(hidden: torch.Tensor, layout: Layout) -> torch.Tensor:
    """One row per original token again: each gets its final slot's (ToMe's "unmerge")."""
    if not layout.stages:
        return hidden
    return hidden.repeat_interleave(layout.stages[-1].sizes.to(hidden.device), dim=1)


def _check_positions(position_ids, start: int, new: int) -> None:
    """Refuse position ids that are not the running count from `start`. One token's was read already (where its
    caller says it starts): reading it again would be a second wait for the device every decode step."""
    if position_ids is not None and new > 1:
        expected = torch.arange(start, start + new, device=position_ids.device)
        if not torch.equal(position_ids.reshape(-1, new), expected.expand(position_ids.numel() // new, new)):
            raise ValueError("slerpviz's merging forward places the tokens itself (merged slots get their own "
                             "positions): position_ids other than the running count are not supported")


def _claims(attention_mask, position_ids, new: int) -> list[tuple[int, str]]:
    """Where the caller says the `new` tokens fed start, and what says so: a 2-D attention mask's length, then the
    first position id (read from the device). A 4-D mask, which generate builds for a static cache, says nothing:
    it is as long as the cache."""
    claims = []
    if batches.is_2d(attention_mask):
        covered = attention_mask.shape[-1]
        claims.append((covered - new, f"its attention mask covers {covered} tokens for the {new} fed"))
    if position_ids is not None:
        first = int(position_ids.reshape(-1)[0])
        claims.append((first, f"its position_ids start at {first}"))
    return claims


def _claimed_start(attention_mask, position_ids, new: int) -> int | None:
    """Where the caller says the `new` tokens fed start (its position ids before its mask), None when it says
    nothing."""
    claims = _claims(attention_mask, position_ids, new)
    return claims[-1][0] if claims else None


@dataclass
class CacheEntry:
    """What a merging forward keeps beside each cache it filled: the prompt's layout, the next token's position and
    each layer's length after its last call (to notice a cache changed behind its back)."""

    layout: Layout | None  # None for a batch, whose rows' layouts its BatchLayout holds
    position: int = 0
    lengths: list[int] = field(default_factory=list)
    batch: batches.BatchLayout | None = None
