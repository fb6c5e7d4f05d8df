"""Generation, token by token: a Run steps a prompt's session (slerpviz.forward) and records what it did in a Trace.

Each step is timed on its own (synchronised on a GPU), so `interleave` can advance the base run and the merged one
step by step without charging either for the other. The decode steps after the prefill run the session's own dynamic
decode or a static decoder (slerpviz.decode). The plots, the panels and the benchmarks read the Trace alone.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from .decode import start_decoding
from .forward import LayerwiseModel, Session
from .pairs import Stage, layer_lengths
from .settings import MergeSettings, Sampling


@dataclass
class Trace:
    """What one run did: the plan, the shapes per layer, and the timings. Plots are drawn from this alone."""

    tokens: list[str]  # prompt tokens as text
    slot_tokens: list[list[list[int]]]  # per stage: the original token positions each slot holds
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


def blank_trace(engine: LayerwiseModel, input_ids: torch.Tensor, settings: MergeSettings, mode: str = "cached"
                ) -> Trace:
    """The trace of a run before its prefill: the prompt's tokens, the shapes and the settings, no plan yet (the
    prefill's session records the stages that ran; `record_plan` a plan made ahead)."""
    return Trace(tokens=engine.token_strings(input_ids), slot_tokens=[], protected=[], cutoffs=list(settings.cutoffs),
                 seq_len_per_layer=[], num_layers=engine.num_layers, mode=mode, settings=asdict(settings),
                 plan_pending=True)


def record_session(trace: Trace, session: Session) -> None:
    """Write what the prompt's prefill did into the trace: the stages that ran, pair cosines, attention scores."""
    record_plan(trace, session.stages)
    trace.pair_cosines = [[c for c, size in zip(cosines.flatten().tolist(), stage.plan.sizes.tolist()) if size == 2]
                          for cosines, stage in zip(session.cosines, session.stages)]
    trace.attention_scores = [a.tolist() if a is not None else [] for a in session.layout.attention]


def record_plan(trace: Trace, stages: list[Stage]) -> None:
    """Write the merge stages into the trace: slots as original positions, protection, sizes, length per layer."""
    trace.slot_tokens = [[list(g) for g in stage.slot_tokens] for stage in stages]
    trace.protected = [stage.plan.protected.tolist() for stage in stages]
    trace.slot_sizes = [stage.sizes.tolist() for stage in stages]
    trace.cutoffs = [stage.cutoff for stage in stages]
    trace.seq_len_per_layer = layer_lengths(trace.prompt_length, stages, trace.num_layers)
    trace.plan_pending = False


class Run:
    """One generation. Iterate it to get a Step per token; `trace` fills in as it goes. Its engine has a tokenizer
    (a MergingEngine, slerpviz.engine, which starts runs), for the text of the tokens.

    Each step is timed on its own (synchronised on a GPU), so two runs can be interleaved step by step and
    neither is charged for the other.
    """

    def __init__(self, engine: LayerwiseModel, input_ids, settings: MergeSettings, sampling: Sampling, mode: str,
                 interrupt: threading.Event | None = None, decode: str | None = None):
        # decode: one of slerpviz.decode's paths; None: slerpviz.decode.default_mode (a CUDA graph on a GPU)
        self.decode, self.static = decode, None  # the static decoder while the run decodes static
        self.engine, self.input_ids, self.settings = engine, input_ids, settings
        self.sampling, self.mode, self.interrupt = sampling, mode, interrupt
        engine.validate(input_ids.shape[-1], settings)
        self.trace = blank_trace(engine, input_ids, settings, mode)  # filled by the prefill's session
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


def interleave(*runs: Run, lock=None, order: random.Random | None = None) -> Iterator[tuple[Step | None, ...]]:
    """Advance the runs one step each in turn until all are done; a finished run contributes None. The tuples keep
    the runs' order.

    Each step is timed inside its run, so neither is charged for the other's step. But what happens between two
    rounds is charged to whichever run steps next: the caller's work on the last tuple, and a browser on the same
    machine drawing it (slerpviz.app.callbacks). With `order`, a coin from it decides each round which run steps
    first, so that cost falls on either side by chance, never always on the first; a fixed alternation would meet a
    page that draws every k-th update on the same side each time. `lock` (held around each step) keeps one step at
    a time on a shared device. Closing this iterator (Stop, or a client that went away) closes all runs.
    """
    lock = lock if lock is not None else contextlib.nullcontext()
    active = list(runs)
    try:
        while any(run is not None for run in active):
            steps = [None] * len(active)
            turns = list(range(len(active)))
            if order is not None:
                order.shuffle(turns)
            for index in turns:
                run = active[index]
                if run is not None:
                    with lock:
                        steps[index] = next(run, None)
                    if steps[index] is None:
                        active[index] = None
            if any(step is not None for step in steps):
                yield tuple(steps)
    finally:
        for run in runs:
            run.close()


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

