"""What the token-pairing plot reads from a trace: the slots each stage merged, their pair cosines, the protected
spans, a pass key's slots, the attention each token received, and which part of a long prompt is drawn in full.

Plain functions of the engine's Trace, no Plotly: `slerpviz.app.pairing` draws from them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from ..engine import Trace
from ..merge import PARALLEL_COS
from ..settings import protected_end
from .token_text import escape

# Prompt tokens drawn in full (labels, hover text, links); a longer prompt gets an overview elsewhere.
DETAIL_TOKENS = 256

# Why a plan chosen at the cutoff is not drawn before the prompt has run, per pair choice.
PENDING_WHY = {
    "similar": "the <i>similar</i> choice picks its pairs from the hidden states at the cutoff",
    "attention": "the <i>attention</i> choice merges the pairs the last prompt tokens attend to least at the cutoff",
}


def pending_why(trace: Trace) -> str:
    choice = trace.settings.get("choice", "similar")
    return PENDING_WHY.get(choice, f"the <i>{escape(str(choice))}</i> choice picks its pairs at the cutoff")


class NeedleSpan(Protocol):
    """Where a pass key sits in the prompt: tokens [start, end), and the key (slerpviz.tasks.Needle)."""

    answer: str
    start: int
    end: int


def token_attention(trace: Trace) -> list[float] | None:
    """The attention each prompt token received at the first cutoff (the `attention` choice), once the prompt has
    run; None otherwise."""
    scores = trace.attention_scores[0] if trace.attention_scores else []
    return [float(s) for s in scores] if scores and len(scores) == trace.prompt_length else None


def attention_scale(scores: Sequence[float]) -> tuple[list[float], float, float, list[float], list[str]]:
    """Attention scores on a log scale (a few tokens, the first above all, draw most of it): the colour value of
    each, the colour range, and colour-bar ticks at powers of ten labelled with the scores themselves."""
    logs = [math.log10(max(s, 1e-12)) for s in scores]
    low, high = min(logs), max(logs)
    if high - low < 1e-6:
        low, high = low - 0.5, high + 0.5
    powers = list(range(math.ceil(low), math.floor(high) + 1))
    step = max(1, math.ceil(len(powers) / 3))  # three labels at most: the colour bar is short
    ticks = [float(e) for e in powers[::-1][::step][::-1]]  # from the top power down, so the largest is labelled
    return logs, low, high, ticks, [f"{10 ** e:g}" for e in ticks]


def needle_slots(groups: list[list[int]], needle: NeedleSpan) -> list[int]:
    """The slots of a stage holding at least one of the needle's tokens."""
    return [i for i, group in enumerate(groups) if group[0] < needle.end and group[-1] >= needle.start]


def slot_parents(groups: list[list[list[int]]], stage: int) -> list[list[int]]:
    """For each slot of `stage`, the indices of the slots of the stage before (or tokens, for stage 0) it merges."""
    if stage == 0:
        return [list(group) for group in groups[0]]
    index_of_first = {group[0]: index for index, group in enumerate(groups[stage - 1])}
    return [[index_of_first[p] for p in group if p in index_of_first] for group in groups[stage]]


def stage_cosines(trace: Trace, stage: int) -> list[float | None]:
    """The cosine of each slot's pair at `stage` (None for single slots, or before the prompt has run)."""
    parents = slot_parents(trace.slot_tokens, stage)
    pairs = [i for i, p in enumerate(parents) if len(p) == 2]
    cosines = trace.pair_cosines[stage] if stage < len(trace.pair_cosines) else []
    by_slot: list[float | None] = [None] * len(parents)
    if len(cosines) == len(pairs):  # the engine lists them in the order of the pair slots
        for slot, value in zip(pairs, cosines):
            by_slot[slot] = float(value)
    return by_slot


def slerp_scale(cosine: float) -> float:
    """How much longer SLERP at t = 0.5 is than the plain mean: 1 / cos(θ/2) = 1 / √((1 + cos θ) / 2).

    The direction is the mean's; only the norm differs. Nearly parallel pairs fall back to the mean itself.
    """
    if abs(cosine) > PARALLEL_COS:
        return 1.0
    return 1.0 / math.sqrt(max((1.0 + cosine) / 2.0, 1e-12))


def protected_spans(trace: Trace) -> list[tuple[int, int, str]]:
    """(first, last, label) of each protected span in original token positions."""
    if not trace.slot_tokens:
        return []
    protected = [pos for group, keep in zip(trace.slot_tokens[0], trace.protected[0]) if keep for pos in group]
    keep_start = int(trace.settings.get("keep_start", 0))
    keep_end, recent = int(trace.settings.get("keep_end", 0)), int(trace.settings.get("keep_recent", 0))
    end_span = protected_end(trace.prompt_length, keep_start, keep_end, recent)
    spans = []
    start = [p for p in protected if p < keep_start]
    end = [p for p in protected if p >= trace.prompt_length - end_span]
    if start:
        spans.append((min(start), max(start), f"protected: keep_start = {keep_start}"))
    if end:
        named = f"keep_end = {keep_end}" if end_span == keep_end else f"the last {end_span} (keep_recent = {recent})"
        spans.append((min(end), max(end), f"protected: {named}"))
    return spans


def detail_span(length: int, start: int = 0, detail: int = DETAIL_TOKENS) -> tuple[int, int]:
    """The prompt positions [first, end) drawn in full: all of a short prompt, `detail` tokens from `start` else."""
    if length <= detail:
        return 0, length
    first = min(max(int(start), 0), length - detail)
    return first, first + detail
