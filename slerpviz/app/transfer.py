"""What crosses from the GPU worker to the page after each step: what a run's trace gained, not the trace.

On a ZeroGPU Space the generation runs in a worker process that holds the GPU, and everything it yields is pickled
across to the page's process. A trace carries the prompt's tokens, the plan's slots, cosines and attention scores:
sending it whole after every token would send all of that again each time, more with every token. So the worker
sends the whole trace once, after the prefill, and then only what a step adds; the page's side rebuilds the trace.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ..engine import Trace


@dataclass(frozen=True)
class TraceChange:
    """What a trace gained since the last change sent: the whole trace the first time (`whole`), then the new
    tokens and step times and the fields a step rewrites."""

    whole: Trace | None = None
    token_ids: tuple[int, ...] = ()
    decode_s: tuple[float, ...] = ()
    text: str = ""
    finished: bool = False
    kv_bytes_per_layer: tuple[int, ...] = ()
    decode: str = ""
    decode_warmup_s: float = 0.0


class ChangeSender:
    """Turns a growing trace into the changes since the last one sent (on the worker's side)."""

    def __init__(self):
        self._sent_tokens = self._sent_steps = None

    def change(self, trace: Trace) -> TraceChange:
        if self._sent_tokens is None:
            self._sent_tokens, self._sent_steps = len(trace.generated_ids), len(trace.decode_s)
            return TraceChange(whole=copy.deepcopy(trace))
        change = TraceChange(
            token_ids=tuple(trace.generated_ids[self._sent_tokens:]), decode_s=tuple(trace.decode_s[self._sent_steps:]),
            text=trace.text, finished=trace.finished, kv_bytes_per_layer=tuple(trace.kv_bytes_per_layer),
            decode=trace.decode, decode_warmup_s=trace.decode_warmup_s)
        self._sent_tokens, self._sent_steps = len(trace.generated_ids), len(trace.decode_s)
        return change


def apply_change(trace: Trace | None, change: TraceChange) -> Trace:
    """The trace on the page's side, brought up to date by one change (the first change gives it)."""
    if change.whole is not None:
        return change.whole
    trace.generated_ids.extend(change.token_ids)
    trace.decode_s.extend(change.decode_s)
    trace.text, trace.finished = change.text, change.finished
    trace.kv_bytes_per_layer = list(change.kv_bytes_per_layer)
    trace.decode, trace.decode_warmup_s = change.decode, change.decode_warmup_s
    return trace
