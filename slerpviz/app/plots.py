"""The pictures: pure functions from the engine's Trace to Plotly figures.

Nothing here touches a model. Every figure is drawn from what a Trace records (the plan, the shapes per layer, the
timings), so the page, the API and the tests all see the same picture for the same trace.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots
from plotly.utils import PlotlyJSONEncoder

from ..engine import Trace
from ..merge import PARALLEL_COS

BASE_COLOR = "#4C78A8"
MERGED_COLOR = "#F58518"
PROTECTED_FILL = "rgba(84, 162, 75, 0.14)"
SINGLE_COLOR = "#9D9D9D"
LINK_COLOR = "rgba(245, 133, 24, 0.75)"
PASS_COLOR = "rgba(157, 157, 157, 0.35)"
NEEDLE_COLOR = "#D62728"
NEEDLE_FILL = "rgba(214, 39, 40, 0.12)"
ATTENTION_SCALE = "YlOrRd"

# plotly_white's look for the page's figures, without the defaults it carries for every other kind of chart (polar,
# ternary, 3-D scenes, maps, ...): those are about 6 KB of JSON in each figure, and the page receives its figures on
# every refresh of a generation.
_WHITE = pio.templates["plotly_white"]
PAGE_TEMPLATE = go.layout.Template(
    layout={key: _WHITE.layout[key] for key in (
        "autotypenumbers", "colorway", "font", "hovermode", "hoverlabel", "paper_bgcolor", "plot_bgcolor", "xaxis",
        "yaxis", "title", "annotationdefaults", "shapedefaults", "coloraxis")},
    data={"bar": _WHITE.data.bar, "scatter": [{"marker": {"colorbar": {"outlinewidth": 0, "ticks": ""}}}],
          "scattergl": [{"marker": {"colorbar": {"outlinewidth": 0, "ticks": ""}}}]},
)


class PageFigure(go.Figure):
    """A figure for the page. Gradio's Plot sends `figure.to_json()`, which escapes every "/", "<" and ">" as a
    six-character \\u002f for embedding in HTML, typed arrays' base64 included: a row of int8 -1 is all slashes,
    seven bytes a character once Gradio quotes the string. The page reads the string with JSON.parse, never as
    HTML, so it is written here as plain JSON: an 8k-token pairing plot crosses the wire in about 230 KB, not 310."""

    def to_json(self, *args, **kwargs) -> str:
        return json.dumps(self.to_dict(), cls=PlotlyJSONEncoder, separators=(",", ":"), ensure_ascii=False)


# How many prompt tokens the pairing plot shows at first; the range slider and pan reach the rest, so a long
# prompt stays readable instead of becoming a smear of overlapping labels.
PAIRING_WINDOW = 48
LABEL_CHARS = 8
# Prompt tokens drawn in full (labels, hover text, links); a longer prompt gets an overview elsewhere.
DETAIL_TOKENS = 256


# --------------------------------------------------------------------------------------------------------------------
# Token text
# --------------------------------------------------------------------------------------------------------------------


def visible_token(text: str) -> str:
    """A token as it reads on screen: line breaks and tabs drawn, leading/trailing spaces as middle dots."""
    shown = text.replace("\n", "↵").replace("\t", "⇥").replace("\r", "")
    stripped = shown.strip(" ")
    lead = len(shown) - len(shown.lstrip(" "))
    tail = len(shown) - len(shown.rstrip(" "))
    return "·" * lead + stripped + "·" * tail if stripped else "·" * len(shown) or "∅"


def _escape(text: str) -> str:
    """Plotly reads labels as a small HTML subset; chat markers like <|im_start|> would vanish unescaped."""
    return html.escape(text, quote=False)


def token_label(text: str, width: int = LABEL_CHARS) -> str:
    shown = visible_token(text)
    return _escape(shown if len(shown) <= width else shown[: width - 1] + "…")


def token_hover(text: str) -> str:
    return "“" + _escape(visible_token(text)) + "”"


# --------------------------------------------------------------------------------------------------------------------
# 1. Token pairing
# --------------------------------------------------------------------------------------------------------------------

# Why a plan chosen at the cutoff is not drawn before the prompt has run, per pair choice.
PENDING_WHY = {
    "similar": "the <i>similar</i> choice picks its pairs from the hidden states at the cutoff",
    "attention": "the <i>attention</i> choice merges the pairs the last prompt tokens attend to least at the cutoff",
}


def pending_why(trace: Trace) -> str:
    choice = trace.settings.get("choice", "similar")
    return PENDING_WHY.get(choice, f"the <i>{_escape(str(choice))}</i> choice picks its pairs at the cutoff")


class NeedleSpan(Protocol):
    """Where a pass key sits in the prompt: tokens [start, end), and the key (slerpviz.bench.retrieval.Needle)."""

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
    parents = slot_parents(trace.groups, stage)
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
    if not trace.groups:
        return []
    protected = [pos for group, keep in zip(trace.groups[0], trace.protected[0]) if keep for pos in group]
    keep_start = int(trace.settings.get("keep_start", 0))
    keep_end = int(trace.settings.get("keep_end", 0))
    spans = []
    start = [p for p in protected if p < keep_start]
    end = [p for p in protected if p >= trace.prompt_length - keep_end]
    if start:
        spans.append((min(start), max(start), f"protected: keep_start = {keep_start}"))
    if end:
        spans.append((min(end), max(end), f"protected: keep_end = {keep_end}"))
    return spans


def same_pairing(shown: Trace, new: Trace) -> bool:
    """Would `new` draw the picture `shown` already draws (or a poorer one: `shown` may have its cosines already, or
    be the realised plan that `new`, a `similar` or `attention` plan still pending, would be planned into)?"""
    if new.plan_pending and not shown.plan_pending:
        return shown.tokens == new.tokens and shown.cutoffs == new.cutoffs and shown.settings == new.settings
    keys = ("keep_start", "keep_end", "method", "size_weighted", "choice")  # a pending plan says which choice waits
    return (shown.tokens == new.tokens and shown.groups == new.groups and shown.protected == new.protected
            and shown.cutoffs == new.cutoffs and shown.plan_pending == new.plan_pending
            and all(shown.settings.get(k) == new.settings.get(k) for k in keys)
            and (not new.pair_cosines or shown.pair_cosines == new.pair_cosines))


def detail_span(length: int, start: int = 0, detail: int = DETAIL_TOKENS) -> tuple[int, int]:
    """The prompt positions [first, end) drawn in full: all of a short prompt, `detail` tokens from `start` else."""
    if length <= detail:
        return 0, length
    first = min(max(int(start), 0), length - detail)
    return first, first + detail


def pairing_figure(trace: Trace, window: int = PAIRING_WINDOW, start: int = 0,
                   detail: int = DETAIL_TOKENS, needle: NeedleSpan | None = None) -> go.Figure:
    """Prompt tokens in the top row, the slots of each merge stage in the rows below, a link for each pair.

    Protected spans are shaded; hovering a slot shows its tokens and the cosine of the pair it merged (known once the
    prompt has run). The view opens on `window` tokens from `start`; drag, zoom or use the range slider for the rest.
    A long prompt is drawn in full (labels, hover text, links) for `detail` tokens from `start`; everywhere else as
    an overview of WebGL markers (position, and the pair cosine as colour) in compact arrays, so an 8k-token prompt
    stays a figure of a few hundred KB rather than megabytes.

    With the `attention` choice, once the prompt has run, the prompt tokens are coloured by the attention they
    received (log scale, with its colour bar). A `needle` (a pass key's token span) is shaded, its tokens and the
    slots they fell into are ringed (legend: "pass key"), and the view opens on it when it lies outside the first
    window.
    """
    tokens = trace.tokens
    n = len(tokens)
    stages = len(trace.groups)
    low, high = detail_span(n, start, detail)
    fig = PageFigure()
    row_names = [f"prompt<br>{n} tokens"]

    def in_detail(group) -> bool:
        return low <= group[0] < high

    attention = token_attention(trace)
    if attention is not None:
        colours, cmin, cmax, tickvals, ticktext = attention_scale(attention)
    # The needle's tokens and the slots holding them: ringed on top of the rows, with hover text of their own.
    ring_x, ring_y, ring_hover, ring_text = [], [], [], []
    if needle is not None:
        for i in range(max(needle.start, 0), min(needle.end, n)):
            ring_x.append(i)
            ring_y.append(0)
            ring_hover.append(f"<b>pass key {_escape(needle.answer)}</b> · token {i}<br>{token_hover(tokens[i])}")
            ring_text.append("" if low <= i < high else token_label(tokens[i]))  # labelled once, detail or not

    # Where each item of the row above sits on the x axis (tokens at their positions, slots at their centres).
    above_x = [float(i) for i in range(n)]
    above_y = 0
    for stage in range(stages):
        groups = trace.groups[stage]
        parents = slot_parents(trace.groups, stage)
        cosines = stage_cosines(trace, stage)
        y = -(stage + 1)
        slot_x = [sum(group) / len(group) for group in groups]
        cutoff = trace.cutoffs[stage]
        row_names.append(f"after layer {cutoff}<br>{len(groups)} slots")
        shown = [slot for slot, group in enumerate(groups) if in_detail(group)]

        # All links of a kind in one trace, segments separated by None: a 500-token prompt stays two traces.
        link_x, link_y, pass_x, pass_y = [], [], [], []
        for slot in shown:
            members = parents[slot]
            xs, ys = (link_x, link_y) if len(members) == 2 else (pass_x, pass_y)
            for member in members:
                xs += [above_x[member], slot_x[slot], None]
                ys += [above_y, y, None]
        fig.add_trace(go.Scatter(x=pass_x, y=pass_y, mode="lines", line=dict(color=PASS_COLOR, width=1),
                                 hoverinfo="skip", showlegend=False, name=f"links to single slots, layer {cutoff}"))
        fig.add_trace(go.Scatter(x=link_x, y=link_y, mode="lines", line=dict(color=LINK_COLOR, width=1.5),
                                 hoverinfo="skip", showlegend=False, name=f"links of merged pairs, layer {cutoff}"))

        hover, labels = {}, {}
        for slot in shown:
            group, members = groups[slot], parents[slot]
            text = "".join(tokens[p] for p in group)
            span = f"token {group[0]}" if len(group) == 1 else f"tokens {group[0]}–{group[-1]}"
            lines = [f"<b>slot {slot}</b> after layer {cutoff} · {span}"]
            if len(members) == 2:
                if stage == 0:
                    lines.append(f"{token_hover(tokens[group[0]])} + {token_hover(tokens[group[1]])}")
                else:
                    lines.append(token_hover(text))
                cosine = cosines[slot]
                lines.append(f"pair cosine: {cosine:.3f}" if cosine is not None
                             else "pair cosine: known once the prompt has run")
                # The factor holds at t = 0.5: always at the first stage, later only for halves of equal size
                # (size-weighted merging moves t towards the larger half).
                sizes = {len(trace.groups[stage - 1][m]) for m in members} if stage else {1}
                halves = len(sizes) == 1 or not trace.settings.get("size_weighted", True)
                if cosine is not None and trace.settings.get("method") == "slerp" and halves:
                    lines.append(f"SLERP = mean × {slerp_scale(cosine):.3f} (1 / cos(θ/2))")
            else:
                lines.append(token_hover(text) + " · kept alone")
            if trace.protected[stage][slot]:
                lines.append("protected")
            hover[slot] = "<br>".join(lines)
            labels[slot] = token_label(text)
        is_pair = [len(m) == 2 for m in parents]
        known = any(c is not None for c, pair in zip(cosines, is_pair) if pair)
        pair_marker = dict(size=11, line=dict(width=1, color="white"))
        if known:
            colorbar = dict(title=dict(text="pair<br>cosine"), thickness=12, len=0.6)
            if attention is not None:  # the attention colour bar takes the top half
                colorbar.update(len=0.45, y=0.0, yanchor="bottom")
            pair_marker.update(colorscale="Viridis", cmin=0.0, cmax=1.0, showscale=stage == 0, colorbar=colorbar)
        else:
            pair_marker.update(color=MERGED_COLOR)
        pair_slots = [i for i in shown if is_pair[i]]
        single_slots = [i for i in shown if not is_pair[i]]
        for name, chosen, marker in (
            (f"merged slots, layer {cutoff}", pair_slots, pair_marker),
            (f"single slots, layer {cutoff}", single_slots, dict(size=9, color=SINGLE_COLOR)),
        ):
            if known and chosen is pair_slots:
                marker = {**marker, "color": [cosines[i] if cosines[i] is not None else 0.0 for i in chosen]}
            fig.add_trace(go.Scatter(
                x=[slot_x[i] for i in chosen], y=[y] * len(chosen), mode="markers+text",
                text=[labels[i] for i in chosen], textposition="bottom center", textfont=dict(size=10),
                hovertext=[hover[i] for i in chosen], hoverinfo="text", marker=marker, name=name, showlegend=False,
            ))
        if len(shown) < len(groups):
            _overview_slots(fig, stage, cutoff, y, groups, slot_x, is_pair, cosines if known else None, low, high)
        if needle is not None:
            for slot in needle_slots(groups, needle):
                group = groups[slot]
                held = [p for p in group if needle.start <= p < needle.end]
                span = f"token {held[0]}" if len(held) == 1 else f"tokens {held[0]}–{held[-1]}"
                others = len(group) - len(held)
                alone = " (kept alone)" if len(parents[slot]) == 1 else \
                    f" and {others} other token{'s' if others != 1 else ''}" if others else ""
                ring_x.append(slot_x[slot])
                ring_y.append(y)
                ring_hover.append(f"<b>pass key {_escape(needle.answer)}</b> · slot {slot} after layer {cutoff}<br>"
                                  f"holds pass-key {span}{alone}<br>{token_hover(''.join(tokens[p] for p in group))}")
                ring_text.append("")
        above_x, above_y = slot_x, y

    token_hovers = [f"<b>token {i}</b><br>{token_hover(tokens[i])}" for i in range(low, high)]
    token_marker = dict(size=8, color=BASE_COLOR)
    if attention is not None:
        token_hovers = [f"{text}<br>attention received: {attention[i]:.4f}"
                        for text, i in zip(token_hovers, range(low, high))]
        token_marker = dict(size=9, color=colours[low:high], colorscale=ATTENTION_SCALE, cmin=cmin, cmax=cmax,
                            line=dict(width=0.5, color="#555"), showscale=True,
                            colorbar=dict(title=dict(text="attention<br>received"), thickness=12, len=0.45, y=1.0,
                                          yanchor="top", tickvals=tickvals, ticktext=ticktext))
    fig.add_trace(go.Scatter(
        x=list(range(low, high)), y=[0] * (high - low), mode="markers+text", name="prompt tokens",
        showlegend=False, text=[token_label(tokens[i]) for i in range(low, high)],
        # Alternate labels above and below the row so neighbours do not overprint each other.
        textposition=["top center" if i % 2 == 0 else "bottom center" for i in range(low, high)],
        textfont=dict(size=10), hovertext=token_hovers, hoverinfo="text", marker=token_marker,
    ))
    for first, end in ((0, low), (high, n)):  # the tokens outside the detailed span: positions step by one
        if end > first:
            marker = dict(size=5, color=BASE_COLOR)
            hover = f"token %{{x}} (labels are drawn for tokens {low}–{high - 1})"
            if attention is not None:
                marker = dict(size=6, color=np.array(colours[first:end], dtype=np.float32),
                              colorscale=ATTENTION_SCALE, cmin=cmin, cmax=cmax)
                hover += " · attention received 10^%{marker.color:.2f}"
            fig.add_trace(go.Scattergl(
                x0=first, dx=1, y=np.zeros(end - first, dtype=np.int8), mode="markers",
                name="overview: prompt tokens", showlegend=False, marker=marker,
                hovertemplate=hover + "<extra></extra>",
            ))
    if needle is not None:
        fig.add_trace(go.Scatter(
            x=ring_x, y=ring_y, mode="markers+text", name="pass key", showlegend=True, text=ring_text,
            textposition="top center", textfont=dict(size=10, color=NEEDLE_COLOR), hovertext=ring_hover,
            hoverinfo="text", marker=dict(symbol="circle-open", size=17, color=NEEDLE_COLOR, line=dict(width=2.5)),
        ))

    top, bottom = 0.75, -stages - 0.75
    for first, last, label in protected_spans(trace):
        fig.add_shape(type="rect", x0=first - 0.5, x1=last + 0.5, y0=bottom, y1=top, fillcolor=PROTECTED_FILL,
                      line=dict(width=0), layer="below")
        fig.add_annotation(x=(first + last) / 2, y=top, text=label, showarrow=False, yanchor="bottom",
                           font=dict(size=11, color="#2E7D32"))
    if needle is not None:
        fig.add_shape(type="rect", x0=needle.start - 0.5, x1=needle.end - 0.5, y0=bottom, y1=top,
                      fillcolor=NEEDLE_FILL, line=dict(width=0), layer="below")
        fig.add_annotation(x=(needle.start + needle.end - 1) / 2, y=top, text=f"pass key {_escape(needle.answer)}",
                           showarrow=False, yanchor="bottom", font=dict(size=11, color=NEEDLE_COLOR))
    view_from = low
    if needle is not None and not low <= needle.start < low + window and start == 0:
        view_from = max(0, min(needle.start - window // 4, n - window))  # open on the needle, not the first tokens
    if trace.plan_pending:
        fig.add_annotation(x=view_from + min(n, window) / 2, y=-0.6, showarrow=False,
                           text=f"{pending_why(trace)}: the pairing appears once the prompt has run")
    elif stages == 0:
        fig.add_annotation(x=view_from + min(n, window) / 2, y=-0.6, showarrow=False,
                           text="no cutoff: the base model, nothing is merged")

    title = f"Token pairing · {n} prompt tokens"
    if trace.plan_pending:
        title += " → pairs chosen at layer " + ", ".join(str(c) for c in trace.cutoffs)
    for stage in range(stages):
        title += f" → {len(trace.groups[stage])} slots after layer {trace.cutoffs[stage]}"
    fig.update_layout(
        title=dict(text=title, x=0.01, font=dict(size=14)),
        template=PAGE_TEMPLATE, height=260 + 110 * max(stages, 1), margin=dict(l=90, r=30, t=60, b=40),
        dragmode="pan", hovermode="closest", showlegend=needle is not None,
        legend=dict(orientation="h", x=1.0, xanchor="right", y=1.0, yanchor="bottom"),
        # The same plan keeps the reader's pan and zoom when the figure is re-sent with the cosines filled in.
        uirevision=f"{n}:{trace.cutoffs}:{trace.settings.get('keep_start')}:{trace.settings.get('keep_end')}:{low}:"
                   f"{view_from}",
    )
    fig.update_xaxes(range=[view_from - 1, view_from + min(n, window)],
                     title=dict(text="prompt position (drag or use the slider below)"),
                     rangeslider=dict(visible=n > window, thickness=0.08), zeroline=False, showgrid=False)
    fig.update_yaxes(tickvals=[-s for s in range(stages + 1)], ticktext=row_names, range=[bottom - 0.1, top + 0.45],
                     fixedrange=True, zeroline=False, showgrid=False)
    return fig


def compact_positions(positions: Sequence[float]) -> np.ndarray:
    """Positions as the smallest typed array that holds them exactly: whole positions (tokens, and slots kept alone
    at the first cutoff) as 16-bit integers, half as many bytes on the wire as the float32 a pair's mean needs."""
    values = np.asarray(positions, dtype=np.float64)
    if values.size and np.all(values == np.round(values)) and 0 <= values.min() and values.max() < 2 ** 16:
        return values.astype(np.uint16)
    return values.astype(np.float32)


def _overview_slots(fig: go.Figure, stage: int, cutoff: int, y: int, groups, slot_x, is_pair, cosines,
                    low: int, high: int) -> None:
    """The slots of a stage outside the detailed span: WebGL markers from compact typed arrays, no text per point."""
    outside = [i for i, group in enumerate(groups) if not low <= group[0] < high]
    for kind, chosen in (("merged", [i for i in outside if is_pair[i]]), ("single", [i for i in outside
                                                                                   if not is_pair[i]])):
        if not chosen:
            continue
        marker = dict(size=7 if kind == "merged" else 5)
        hover = f"slot at position %{{x}} after layer {cutoff}"
        if kind == "single":
            marker["color"] = SINGLE_COLOR
            hover += " · kept alone"
        elif cosines is not None:
            marker.update(color=np.array([cosines[i] if cosines[i] is not None else 0.0 for i in chosen],
                                         dtype=np.float32),
                          colorscale="Viridis", cmin=0.0, cmax=1.0)
            hover += " · pair cosine %{marker.color:.3f}"
        else:
            marker["color"] = MERGED_COLOR
        fig.add_trace(go.Scattergl(
            x=compact_positions([slot_x[i] for i in chosen]), y=np.full(len(chosen), y, dtype=np.int8),
            mode="markers", marker=marker, name=f"overview: {kind} slots, layer {cutoff}", showlegend=False,
            hovertemplate=hover + "<extra></extra>",
        ))


# --------------------------------------------------------------------------------------------------------------------
# 2. Sequence length and attention cost per layer
# --------------------------------------------------------------------------------------------------------------------


def attention_cost(seq_len_per_layer: Sequence[int]) -> list[int]:
    """Token pairs each layer's attention scores at prefill: length², the part of the cost that merging shrinks."""
    return [length * length for length in seq_len_per_layer]


def length_figure(merged: Trace, base: Trace | None = None) -> go.Figure:
    """Sequence length per layer at prefill, base and merged, with the attention cost per layer beside it.

    The base runs the whole prompt through every layer, so without a base trace its row is the prompt length.
    """
    base_lengths = base.seq_len_per_layer if base is not None else [merged.prompt_length] * merged.num_layers
    merged_lengths = merged.seq_len_per_layer  # empty while a `similar` plan waits for the prefill
    layers = list(range(merged.num_layers))
    base_cost, merged_cost = attention_cost(base_lengths), attention_cost(merged_lengths)
    cost_title = "Attention cost per layer ∝ length²"
    if merged_lengths:
        cost_title += f" · merged = {sum(merged_cost) / max(sum(base_cost), 1):.0%} of base"
    fig = make_subplots(rows=1, cols=2, figure=PageFigure(), horizontal_spacing=0.1,
                        subplot_titles=("Sequence length per layer (prefill)", cost_title))
    if not merged_lengths:
        fig.add_annotation(text="merged lengths: known once the prompt has run", x=0.5, y=1.0, xref="paper",
                           yref="paper", showarrow=False, yanchor="bottom", yshift=-40)
    for name, lengths, cost, color, dash in (
        ("base", base_lengths, base_cost, BASE_COLOR, "solid"),
        ("merged", merged_lengths, merged_cost, MERGED_COLOR, "dash"),
    ):
        fig.add_trace(go.Scatter(x=layers[: len(lengths)], y=lengths, mode="lines+markers", name=name,
                                 legendgroup=name, line=dict(color=color, dash=dash, shape="hv"), marker=dict(size=5),
                                 hovertemplate="layer %{x}: %{y} positions<extra>" + name + "</extra>"), row=1, col=1)
        fig.add_trace(go.Bar(x=layers[: len(cost)], y=cost, marker_color=color, name=name, legendgroup=name,
                             showlegend=False,
                             hovertemplate="layer %{x}: %{y:,} token pairs<extra>" + name + "</extra>"), row=1, col=2)
    for cutoff in merged.cutoffs:
        fig.add_vline(x=cutoff - 0.5, line=dict(color="#888", dash="dot", width=1), row=1, col=1)
    fig.update_xaxes(title=dict(text="decoder layer"))
    fig.update_yaxes(title=dict(text="positions"), rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title=dict(text="length² (token pairs)"), rangemode="tozero", row=1, col=2)
    fig.update_layout(template=PAGE_TEMPLATE, height=340, barmode="group", margin=dict(l=60, r=20, t=60, b=50),
                      legend=dict(orientation="h", y=-0.22))
    return fig


# --------------------------------------------------------------------------------------------------------------------
# 3. Per-token latency, 4. KV cache per layer
# --------------------------------------------------------------------------------------------------------------------


def step_seconds(trace: Trace) -> list[float]:
    """Seconds of each generated token: the first includes the prefill, the rest are decode steps."""
    return [trace.prefill_s, *trace.decode_s] if trace.generated_ids else []


def latency_figure(base: Trace, merged: Trace) -> go.Figure:
    """Milliseconds per generated token over the generation, both models; token 1 is the prefill (log scale)."""
    fig = PageFigure()
    for name, trace, color in (("base", base, BASE_COLOR), ("merged", merged, MERGED_COLOR)):
        seconds = step_seconds(trace)
        fig.add_trace(go.Scatter(
            x=list(range(1, len(seconds) + 1)), y=[s * 1000 for s in seconds], mode="lines+markers", name=name,
            line=dict(color=color), marker=dict(size=5),
            hovertemplate="token %{x}: %{y:.1f} ms<extra>" + name + "</extra>",
        ))
    fig.update_layout(
        title=dict(text="Per-token latency (token 1 includes the prefill)", x=0.01, font=dict(size=14)),
        template=PAGE_TEMPLATE, height=320, margin=dict(l=60, r=20, t=50, b=50),
        legend=dict(orientation="h", y=-0.25),
    )
    fig.update_xaxes(title=dict(text="generated token"), rangemode="tozero")
    # Ticks at 1-2-5 steps: the prefill is often ten times a decode step, and a log axis keeps both readable.
    milliseconds = [s * 1000 for trace in (base, merged) for s in step_seconds(trace) if s > 0]
    fig.update_yaxes(title=dict(text="ms (log)"), type="log", tickvals=list(LATENCY_TICKS),
                     ticktext=[f"{t:g}" for t in LATENCY_TICKS], range=latency_range(milliseconds))
    return fig


LATENCY_TICKS = tuple(m * 10**e for e in range(-2, 7) for m in (1, 2, 5))


def latency_range(milliseconds: Sequence[float]) -> list[float] | None:
    """The log-axis range (in log10 units) from the tick at or below the fastest step to the tick above the slowest,
    so the axis always shows at least two labelled ticks, even for a single point (which Plotly would otherwise
    zoom into between two ticks, leaving the axis unlabelled)."""
    if not milliseconds:
        return None
    low, high = min(milliseconds), max(milliseconds)
    below = max([t for t in LATENCY_TICKS if t <= low], default=LATENCY_TICKS[0])
    above = min([t for t in LATENCY_TICKS if t > high], default=LATENCY_TICKS[-1])
    return [math.log10(below) - 0.05, math.log10(above) + 0.05]


def kv_comparison(base_bytes: int, merged_bytes: int) -> str:
    """The merged KV cache against the base one, in the one wording the panel and the plot share."""
    change = 1 - merged_bytes / base_bytes
    if round(change * 100) == 0:
        return "the same size as base"
    return f"{abs(change):.0%} {'smaller' if change > 0 else 'larger'} than base"


def kv_figure(base: Trace, merged: Trace) -> go.Figure:
    """Bytes of KV cache each layer holds, both models: layers after a cutoff hold the shorter, merged sequence."""
    fig = PageFigure()
    for name, trace, color in (("base", base, BASE_COLOR), ("merged", merged, MERGED_COLOR)):
        sizes = trace.kv_bytes_per_layer
        fig.add_trace(go.Bar(x=list(range(len(sizes))), y=[b / 1024 for b in sizes], name=name, marker_color=color,
                             hovertemplate="layer %{x}: %{y:,.1f} KiB<extra>" + name + "</extra>"))
    total_base, total_merged = sum(base.kv_bytes_per_layer), sum(merged.kv_bytes_per_layer)
    if total_base and total_merged:
        title = f"KV cache per layer · merged: {kv_comparison(total_base, total_merged)}"
    else:
        title = "KV cache per layer"
    if not (base.kv_bytes_per_layer or merged.kv_bytes_per_layer):
        why = "recompute mode keeps no KV cache" if "recompute" in (base.mode, merged.mode) else "no tokens yet"
        fig.add_annotation(text=why, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font=dict(size=14))
    fig.update_layout(
        title=dict(text=title, x=0.01, font=dict(size=14)), template=PAGE_TEMPLATE, height=320, barmode="group",
        margin=dict(l=60, r=20, t=50, b=50), legend=dict(orientation="h", y=-0.25),
    )
    fig.update_xaxes(title=dict(text="decoder layer"))
    fig.update_yaxes(title=dict(text="KiB"), rangemode="tozero")
    return fig
