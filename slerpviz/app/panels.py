"""What the page's panels say, as Markdown: figures and comparisons drawn from traces, and messages for errors.

Plain functions of traces and settings, with no Gradio in them; the callbacks (slerpviz.callbacks) put the text in
place and `slerpviz.app.plots` draws the pictures.
"""

from __future__ import annotations

import html
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import presets
from .. import settings as checks
from . import pairing_data
from .token_text import visible_token
from . import plots
from ..tasks import find_passkey, is_correct
from ..engine import Sampling, Trace



@dataclass(frozen=True)
class Figures:
    """One panel's live figures, from its own steps only."""

    tokens: int
    first_token_s: float | None
    # The decode rate: one over the median decode step. A mean would follow the few steps on which a browser on the
    # same machine drew a figure, and those fall on either side by chance (slerpviz.generation.interleave).
    tokens_per_s: float | None
    elapsed_s: float
    kv_bytes: int


def panel_figures(trace: Trace) -> Figures:
    tokens = len(trace.generated_ids)
    decode = sum(trace.decode_s)
    return Figures(
        tokens=tokens,
        first_token_s=trace.prefill_s if tokens else None,
        tokens_per_s=1 / statistics.median(trace.decode_s) if decode > 0 else None,
        elapsed_s=(trace.prefill_s + decode) if tokens else 0.0,
        kv_bytes=sum(trace.kv_bytes_per_layer),
    )


@dataclass(frozen=True)
class Agreement:
    first_difference: int | None  # index of the first generated token that differs; None when identical
    agreeing: int  # positions where both generated the same token
    compared: int  # the longer of the two generations

    @property
    def share(self) -> float:
        return self.agreeing / self.compared if self.compared else 1.0


def agreement(base_ids: Sequence[int], merged_ids: Sequence[int]) -> Agreement:
    """Compare the two generations position by position; a missing token (one stopped earlier) disagrees."""
    agreeing = sum(a == b for a, b in zip(base_ids, merged_ids))
    first = next((i for i, (a, b) in enumerate(zip(base_ids, merged_ids)) if a != b), None)
    if first is None and len(base_ids) != len(merged_ids):
        first = min(len(base_ids), len(merged_ids))
    return Agreement(first, agreeing, max(len(base_ids), len(merged_ids)))


def human_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"  # pragma: no cover


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} s"


DECODE_PATHS = {
    "dynamic": "dynamic (a growing cache)",
    "static": "static (fixed buffers, nothing read back)",
    "graph": "CUDA graph (one launch a token)",
    "compiled": "compiled (torch.compile, CUDA graphs)",
}


def decode_path(trace: Trace) -> str:
    """How the decode steps ran (slerpviz.decode's path, or why it fell back), and the set-up no step was charged."""
    text = DECODE_PATHS.get(trace.decode, trace.decode)
    if trace.decode_warmup_s >= 0.005:
        text += f" · set up in {trace.decode_warmup_s:.2f} s, in no step's time"
    return text


def panel_markdown(trace: Trace, base: Trace | None = None, stopped: bool = False) -> str:
    """The live figures of one panel; the merged panel (given the base trace) adds what merging saved."""
    figures = panel_figures(trace)
    end = " · done" if trace.finished else " · stopped" if stopped else ""
    rows = [
        ("time to first token", _seconds(figures.first_token_s)),
        ("tokens per second (median decode step)",
         "—" if figures.tokens_per_s is None else f"{figures.tokens_per_s:.1f}"),
        ("elapsed (own steps)", _seconds(figures.elapsed_s if figures.tokens else None)),
        ("tokens generated", f"{figures.tokens}{end}"),
    ]
    if trace.decode:
        rows.append(("decode", decode_path(trace)))
    if trace.mode == "recompute":
        rows.append(("KV cache", "none (recompute mode re-runs the whole sequence each step)"))
    else:
        kv = human_bytes(figures.kv_bytes) if figures.kv_bytes else "—"
        if base is not None and figures.kv_bytes and sum(base.kv_bytes_per_layer):
            kv += " · " + plots.kv_comparison(sum(base.kv_bytes_per_layer), figures.kv_bytes)
            if len(base.generated_ids) != figures.tokens:
                kv += f" (base at {len(base.generated_ids)} tokens)"
        rows.append(("KV cache", kv))
    length = f"{trace.prompt_length} prompt tokens"
    if trace.plan_pending:
        rows.append(("sequence", f"{length} → pairs chosen at the cutoff"))
    elif trace.cutoffs:
        stages = "".join(f" → {len(slots)} after layer {layer}" for slots, layer in zip(trace.slot_tokens, trace.cutoffs))
        rows.append(("sequence", length + stages))
    else:
        rows.append(("sequence", f"{length} at every layer"))
    return "| live figure | value |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


GREETING = "Type a prompt or click an example, then press **Run**."
PENDING_COMPARISON = "*The comparison appears when both generations have finished.*"
NOTHING_TO_COMPARE = "**Stopped at token 0**: the prompt was still running, nothing to compare."


def comparison_markdown(base: Trace, merged: Trace, token_text: Callable[[int], str], stopped: bool = False) -> str:
    """Where the two generations part, and how much of them agrees: once both have finished, or over the tokens
    generated before a Stop."""
    prefix = ""
    if stopped and not (base.finished and merged.finished):
        reached = max(len(base.generated_ids), len(merged.generated_ids))
        prefix = f"**Stopped at token {reached}**; over the tokens generated so far: "
        if not reached:
            return NOTHING_TO_COMPARE
    elif not (base.finished and merged.finished):
        return PENDING_COMPARISON
    result = agreement(base.generated_ids, merged.generated_ids)
    if result.first_difference is None:
        first = f"**Identical**: all {result.compared} generated tokens match."
    else:
        i = result.first_difference

        def shown(ids):
            return f"`{escape(visible_token(token_text(ids[i])))}`" if i < len(ids) else "*(stopped)*"

        first = f"**First difference at generated token {i + 1}**: base {shown(base.generated_ids)} · merged " \
                f"{shown(merged.generated_ids)}."
    return f"{prefix}{first} **{result.share:.0%}** of tokens agree position by position ({result.agreeing} of " \
           f"{result.compared})." + passkey_markdown(base, merged, stopped)


def passkey_markdown(base: Trace, merged: Trace, stopped: bool = False) -> str:
    """When the prompt holds a pass key: did each side answer it? (Empty otherwise.)"""
    needle = find_passkey(base.tokens)
    if needle is None:
        return ""
    found = is_correct(needle.answer, base.text), is_correct(needle.answer, merged.text)
    verdict = {(True, True): "both found it", (False, False): "neither found it",
               (True, False): "base found it, merged did not", (False, True): "merged found it, base did not"}[found]
    when = " (in the tokens generated before Stop)" if stopped and not (base.finished and merged.finished) else ""
    return f"\n\n**Pass key {escape(needle.answer)}**: {verdict}{when}."


def status_markdown(base: Trace, merged: Trace, sampling: Sampling, stopped: bool = False) -> str:
    if stopped and not (base.finished and merged.finished):
        return f"**Stopped** at token {max(len(base.generated_ids), len(merged.generated_ids))}: both generations " \
               f"were cancelled together (base {len(base.generated_ids)} tokens, merged " \
               f"{len(merged.generated_ids)} tokens)."
    if base.finished and merged.finished:
        return f"**Done**: base {len(base.generated_ids)} tokens, merged {len(merged.generated_ids)} tokens."
    return f"**Generating…** base {len(base.generated_ids)}/{sampling.max_new_tokens} · merged " \
           f"{len(merged.generated_ids)}/{sampling.max_new_tokens} tokens"


def escape(text: str) -> str:
    """Model names, messages and tokens as literal text in Markdown or an error pop-up (both read HTML)."""
    return html.escape(text, quote=False)


def message_for(error: BaseException) -> str:
    """A page-sized message for an error: what went wrong and what to try, never a traceback."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return "Out of memory: try a shorter prompt, fewer new tokens or a smaller model."
    if isinstance(error, ValueError):
        return str(error)
    if isinstance(error, OSError):
        return f"Could not load the model: {error}"
    return f"{type(error).__name__}: {error}"


# --------------------------------------------------------------------------------------------------------------------
# The status line
# --------------------------------------------------------------------------------------------------------------------

PREFILL = "**Prefill**: running the prompt through both models…"
FIXED_MODEL = "**The model is fixed on this Space**: ZeroGPU loads it when the app starts."
WAITING_FOR_MODEL = "*The pairing plot appears once the model is loaded.*"
NOTHING_GENERATING = "**Stopped**: nothing was generating."
STOPPED_IN_PREFILL = "**Stopped** during the prefill: no tokens were generated."


def ready_markdown(name: str, num_layers: int) -> str:
    return f"**Ready**: {escape(name)} ({num_layers} layers). {GREETING}"


def loading_markdown(progress: str) -> str:
    return f"**Loading…** {escape(progress)}"


def cannot_plan_markdown(error: BaseException) -> str:
    return f"**Cannot plan**: {escape(message_for(error))}"


def load_failure(model: str, error: BaseException, serving: str | None) -> tuple[str, str]:
    """A failed model switch, as a pop-up's plain text and the status line's Markdown: why, in one line (a hub error
    runs to a paragraph with links), and the model still serving."""
    reason = message_for(error) if isinstance(error, ValueError) else checks.one_line(error)
    warning = f"Could not load {model}: {reason}" + (f" Still serving {serving}." if serving else "")
    status = f"**Could not load** {escape(str(model))}: {escape(reason)}" + (
        f" Still serving **{escape(serving)}**." if serving else "")
    return warning, status


def plan_markdown(trace: Trace) -> str:
    """What a plan does to the prompt, before generating; a pass key in the prompt is pointed out."""
    needle = find_passkey(trace.tokens)
    found = "" if needle is None else (f" The prompt holds **pass key {escape(needle.answer)}** (tokens "
                                       f"{needle.start}–{needle.end - 1}), marked in the pairing plot.")
    if trace.plan_pending:
        why = pairing_data.pending_why(trace).replace("<i>", "*").replace("</i>", "*")
        return (f"{trace.prompt_length} prompt tokens. {why[0].upper()}{why[1:]}: the pairing appears once the "
                f"prompt has run.{found} Press Run to generate.")
    if not trace.cutoffs:
        return f"{trace.prompt_length} prompt tokens; no cutoff, so the merged side runs the base model.{found}"
    after = ", ".join(f"{len(g)} after layer {c}" for g, c in zip(trace.slot_tokens, trace.cutoffs))
    return f"{trace.prompt_length} prompt tokens → {after}.{found} Press Run to generate."


def preset_note() -> str:
    """The presets in a line each (slerpviz.presets): what each trades, measured speed for answers kept. The detail
    is `preset_details`, behind a click: beside the controls the whole of it was a wall of text."""
    lines = [f"- **{name}**: {escape(preset.summary or preset.description)}"
             for name, preset in presets.PRESETS.items()]
    return ("**Presets** (measured in the README): the page opens on `recommended`; choose one and press the button "
            "to fill in its merge settings for the loaded model.\n\n" + "\n".join(lines))


def preset_details() -> str:
    """What each preset does, in full (slerpviz.presets)."""
    return "\n".join(f"- **{name}**: {escape(preset.description)}" for name, preset in presets.PRESETS.items())
