"""The token-pairing plot: which prompt tokens each merge stage paired, drawn from the engine's Trace.

Prompt tokens in the top row, the slots of each merge stage in the rows below, a link for each pair. Small pure
functions, one part of the picture each; `pairing_figure` puts them together. What they read from a trace (its
slots, cosines, protected spans, a pass key's slots) comes from `slerpviz.app.pairing_data`, how a token reads on
screen from `slerpviz.app.token_text`, and the page's look from `slerpviz.app.plots`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from ..engine import Trace
from .pairing_data import (DETAIL_TOKENS, NeedleSpan, attention_scale, detail_span, needle_slots, pending_why,
                           protected_spans, slerp_scale, slot_parents, stage_cosines, token_attention)
from .plots import BASE_COLOR, MERGED_COLOR, PAGE_TEMPLATE, PageFigure
from .token_text import escape, token_hover, token_label

PROTECTED_FILL = "rgba(84, 162, 75, 0.14)"
SINGLE_COLOR = "#9D9D9D"
LINK_COLOR = "rgba(245, 133, 24, 0.75)"
PASS_COLOR = "rgba(157, 157, 157, 0.35)"
SPAN_COLOR = "rgba(245, 133, 24, 0.18)"
NEEDLE_COLOR = "#D62728"
NEEDLE_FILL = "rgba(214, 39, 40, 0.12)"
ATTENTION_SCALE = "YlOrRd"

# How many prompt tokens the pairing plot shows at first; the range slider and pan reach the rest, so a long
# prompt stays readable instead of becoming a smear of overlapping labels.
PAIRING_WINDOW = 48


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
    n = len(trace.tokens)
    low, high = detail_span(n, start, detail)
    attention = token_attention(trace)
    fig = PageFigure()
    above_x = [float(i) for i in range(n)]  # where each item of the row above sits: tokens at their positions
    for stage in range(len(trace.slot_tokens)):
        fig.add_traces(stage_traces(trace, stage, above_x, low, high, attention is not None))
        above_x = slot_centres(trace.slot_tokens[stage])  # slots at their centres
    fig.add_traces(prompt_row(trace, low, high, attention))
    if needle is not None:
        fig.add_trace(needle_rings(trace, needle, low, high))
    shade_protected_spans(fig, trace)
    if needle is not None:
        shade_needle(fig, trace, needle)
    view_from = opening_view(n, low, start, window, needle)
    note_missing_pairing(fig, trace, view_from, window)
    lay_out_pairing(fig, trace, low, view_from, window, needle)
    return fig


def same_pairing(shown: Trace, new: Trace) -> bool:
    """Would `new` draw the picture `shown` already draws (or a poorer one: `shown` may have its cosines already, or
    be the realised plan that `new`, a `similar` or `attention` plan still pending, would be planned into)?"""
    if new.plan_pending and not shown.plan_pending:
        return shown.tokens == new.tokens and shown.cutoffs == new.cutoffs and shown.settings == new.settings
    # A pending plan says which choice waits.
    keys = ("keep_start", "keep_end", "keep_recent", "method", "size_weighted", "choice")
    return (shown.tokens == new.tokens and shown.slot_tokens == new.slot_tokens and shown.protected == new.protected
            and shown.cutoffs == new.cutoffs and shown.plan_pending == new.plan_pending
            and all(shown.settings.get(k) == new.settings.get(k) for k in keys)
            and (not new.pair_cosines or shown.pair_cosines == new.pair_cosines))


# --------------------------------------------------------------------------------------------------------------------
# The rows of the merge stages
# --------------------------------------------------------------------------------------------------------------------


def slot_centres(groups: list[list[int]]) -> list[float]:
    """Where each slot of a stage sits on the x axis: the mean position of its tokens."""
    return [sum(group) / len(group) for group in groups]


def stage_traces(trace: Trace, stage: int, above_x: list[float], low: int, high: int,
                 attention_shown: bool) -> list:
    """The row of one merge stage: the links to the row above and the slots, in full for the slots starting in
    [low, high), as an overview of markers for the rest."""
    groups = trace.slot_tokens[stage]
    parents = slot_parents(trace.slot_tokens, stage)
    slot_x = slot_centres(groups)
    shown = [slot for slot, group in enumerate(groups) if low <= group[0] < high]
    cosines = stage_cosines(trace, stage)
    is_pair = [len(m) == 2 for m in parents]
    known = any(c is not None for c, pair in zip(cosines, is_pair) if pair)
    traces = [slot_spans(trace, stage, shown), *stage_links(trace, stage, parents, shown, above_x, slot_x),
              *slot_traces(trace, stage, parents, cosines, known, shown, slot_x, attention_shown)]
    if len(shown) < len(groups):
        traces += overview_slot_traces(trace.cutoffs[stage], -(stage + 1), groups, slot_x, is_pair,
                                       cosines if known else None, low, high)
    return traces


def slot_spans(trace: Trace, stage: int, shown: list[int]) -> go.Scatter:
    """A bar under each shown slot that holds several tokens, from its first prompt token to its last: a group of
    four or eight (a layer merged twice, or stages composing) reads as the run of tokens it took in."""
    groups, y = trace.slot_tokens[stage], -(stage + 1)
    xs, ys = [], []
    for slot in shown:
        group = groups[slot]
        if len(group) > 1:
            xs += [group[0] - 0.3, group[-1] + 0.3, None]
            ys += [y, y, None]
    return go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=SPAN_COLOR, width=10), hoverinfo="skip",
                      showlegend=False, name=f"token spans, layer {trace.cutoffs[stage]}")


def stage_links(trace: Trace, stage: int, parents: list[list[int]], shown: list[int], above_x: list[float],
                slot_x: list[float]) -> list[go.Scatter]:
    """A line from each shown slot to each item of the row above it holds: those of single slots, then those of
    merged pairs. All links of a kind in one trace, segments separated by None: a 500-token prompt stays two
    traces."""
    cutoff, y = trace.cutoffs[stage], -(stage + 1)
    link_x, link_y, pass_x, pass_y = [], [], [], []
    for slot in shown:
        members = parents[slot]
        xs, ys = (link_x, link_y) if len(members) == 2 else (pass_x, pass_y)
        for member in members:
            xs += [above_x[member], slot_x[slot], None]
            ys += [-stage, y, None]
    return [go.Scatter(x=pass_x, y=pass_y, mode="lines", line=dict(color=PASS_COLOR, width=1),
                       hoverinfo="skip", showlegend=False, name=f"links to single slots, layer {cutoff}"),
            go.Scatter(x=link_x, y=link_y, mode="lines", line=dict(color=LINK_COLOR, width=1.5),
                       hoverinfo="skip", showlegend=False, name=f"links of merged pairs, layer {cutoff}")]


def slot_hover(trace: Trace, stage: int, slot: int, members: list[int], cosine: float | None) -> str:
    """A slot's hover text: its tokens, and for a pair its cosine and how far SLERP lengthens the mean."""
    group, cutoff, tokens = trace.slot_tokens[stage][slot], trace.cutoffs[stage], trace.tokens
    text = "".join(tokens[p] for p in group)
    span = f"token {group[0]}" if len(group) == 1 else f"tokens {group[0]}–{group[-1]}"
    lines = [f"<b>slot {slot}</b> after layer {cutoff} · {span}"]
    if len(members) == 2:
        if stage == 0:
            lines.append(f"{token_hover(tokens[group[0]])} + {token_hover(tokens[group[1]])}")
        else:
            lines.append(token_hover(text))
        lines.append(f"pair cosine: {cosine:.3f}" if cosine is not None
                     else "pair cosine: known once the prompt has run")
        # The factor holds at t = 0.5: always at the first stage, later only for halves of equal size
        # (size-weighted merging moves t towards the larger half).
        sizes = {len(trace.slot_tokens[stage - 1][m]) for m in members} if stage else {1}
        halves = len(sizes) == 1 or not trace.settings.get("size_weighted", True)
        if cosine is not None and trace.settings.get("method") == "slerp" and halves:
            lines.append(f"SLERP = mean × {slerp_scale(cosine):.3f} (1 / cos(θ/2))")
    else:
        lines.append(token_hover(text) + " · kept alone")
    if trace.protected[stage][slot]:
        lines.append("protected")
    return "<br>".join(lines)


def pair_marker(stage: int, known: bool, attention_shown: bool) -> dict:
    """The merged slots' marker: coloured by pair cosine once known (the colour bar drawn once, at the first stage,
    below the attention one when that is drawn), the merged colour before."""
    marker = dict(size=11, line=dict(width=1, color="white"))
    if known:
        colorbar = dict(title=dict(text="pair<br>cosine"), thickness=12, len=0.6)
        if attention_shown:  # the attention colour bar takes the top half
            colorbar.update(len=0.45, y=0.0, yanchor="bottom")
        marker.update(colorscale="Viridis", cmin=0.0, cmax=1.0, showscale=stage == 0, colorbar=colorbar)
    else:
        marker.update(color=MERGED_COLOR)
    return marker


def slot_traces(trace: Trace, stage: int, parents: list[list[int]], cosines: list[float | None], known: bool,
                shown: list[int], slot_x: list[float], attention_shown: bool) -> list[go.Scatter]:
    """The shown slots of a stage, labelled and with hover text: the merged pairs, then the slots kept alone."""
    groups, cutoff, y = trace.slot_tokens[stage], trace.cutoffs[stage], -(stage + 1)
    hover = {slot: slot_hover(trace, stage, slot, parents[slot], cosines[slot]) for slot in shown}
    labels = {slot: token_label("".join(trace.tokens[p] for p in groups[slot])) for slot in shown}
    pair_slots = [i for i in shown if len(parents[i]) == 2]
    single_slots = [i for i in shown if len(parents[i]) != 2]
    traces = []
    for name, chosen, marker in (
        (f"merged slots, layer {cutoff}", pair_slots, pair_marker(stage, known, attention_shown)),
        (f"single slots, layer {cutoff}", single_slots, dict(size=9, color=SINGLE_COLOR)),
    ):
        if known and chosen is pair_slots:
            marker = {**marker, "color": [cosines[i] if cosines[i] is not None else 0.0 for i in chosen]}
        traces.append(go.Scatter(
            x=[slot_x[i] for i in chosen], y=[y] * len(chosen), mode="markers+text",
            text=[labels[i] for i in chosen], textposition="bottom center", textfont=dict(size=10),
            hovertext=[hover[i] for i in chosen], hoverinfo="text", marker=marker, name=name, showlegend=False,
        ))
    return traces


def compact_positions(positions: Sequence[float]) -> np.ndarray:
    """Positions as the smallest typed array that holds them exactly: whole positions (tokens, and slots kept alone
    at the first cutoff) as 16-bit integers, half as many bytes on the wire as the float32 a pair's mean needs."""
    values = np.asarray(positions, dtype=np.float64)
    if values.size and np.all(values == np.round(values)) and 0 <= values.min() and values.max() < 2 ** 16:
        return values.astype(np.uint16)
    return values.astype(np.float32)


def overview_slot_traces(cutoff: int, y: int, groups, slot_x, is_pair, cosines, low: int, high: int) -> list:
    """The slots of a stage outside the detailed span: WebGL markers from compact typed arrays, no text per point."""
    outside = [i for i, group in enumerate(groups) if not low <= group[0] < high]
    traces = []
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
        traces.append(go.Scattergl(
            x=compact_positions([slot_x[i] for i in chosen]), y=np.full(len(chosen), y, dtype=np.int8),
            mode="markers", marker=marker, name=f"overview: {kind} slots, layer {cutoff}", showlegend=False,
            hovertemplate=hover + "<extra></extra>",
        ))
    return traces


# --------------------------------------------------------------------------------------------------------------------
# The prompt's row, and a pass key's rings
# --------------------------------------------------------------------------------------------------------------------


def prompt_row(trace: Trace, low: int, high: int, attention: list[float] | None) -> list:
    """The prompt tokens: labelled in [low, high), as overview markers either side; coloured by the attention they
    received when it is known."""
    scale = attention_scale(attention) if attention is not None else None
    return [prompt_token_trace(trace, low, high, attention, scale),
            *token_overview_traces(len(trace.tokens), low, high, scale)]


def prompt_token_trace(trace: Trace, low: int, high: int, attention: list[float] | None, scale) -> go.Scatter:
    """The tokens drawn in full: a marker, a label and hover text each (with the attention colour bar if known)."""
    tokens = trace.tokens
    hovers = [f"<b>token {i}</b><br>{token_hover(tokens[i])}" for i in range(low, high)]
    marker = dict(size=8, color=BASE_COLOR)
    if scale is not None:
        colours, cmin, cmax, tickvals, ticktext = scale
        hovers = [f"{text}<br>attention received: {attention[i]:.4f}" for text, i in zip(hovers, range(low, high))]
        marker = dict(size=9, color=colours[low:high], colorscale=ATTENTION_SCALE, cmin=cmin, cmax=cmax,
                      line=dict(width=0.5, color="#555"), showscale=True,
                      colorbar=dict(title=dict(text="attention<br>received"), thickness=12, len=0.45, y=1.0,
                                    yanchor="top", tickvals=tickvals, ticktext=ticktext))
    return go.Scatter(
        x=list(range(low, high)), y=[0] * (high - low), mode="markers+text", name="prompt tokens",
        showlegend=False, text=[token_label(tokens[i]) for i in range(low, high)],
        # Alternate labels above and below the row so neighbours do not overprint each other.
        textposition=["top center" if i % 2 == 0 else "bottom center" for i in range(low, high)],
        textfont=dict(size=10), hovertext=hovers, hoverinfo="text", marker=marker,
    )


def token_overview_traces(n: int, low: int, high: int, scale) -> list[go.Scattergl]:
    """The tokens outside the detailed span, before it and after it: positions step by one, no text per point."""
    traces = []
    for first, end in ((0, low), (high, n)):
        if end > first:
            marker = dict(size=5, color=BASE_COLOR)
            hover = f"token %{{x}} (labels are drawn for tokens {low}–{high - 1})"
            if scale is not None:
                colours, cmin, cmax = scale[:3]
                marker = dict(size=6, color=np.array(colours[first:end], dtype=np.float32),
                              colorscale=ATTENTION_SCALE, cmin=cmin, cmax=cmax)
                hover += " · attention received 10^%{marker.color:.2f}"
            traces.append(go.Scattergl(
                x0=first, dx=1, y=np.zeros(end - first, dtype=np.int8), mode="markers",
                name="overview: prompt tokens", showlegend=False, marker=marker,
                hovertemplate=hover + "<extra></extra>",
            ))
    return traces


def needle_token_points(trace: Trace, needle: NeedleSpan, low: int, high: int) -> list[tuple]:
    """(x, y, hover, label) of each pass-key token: labelled here only outside the detailed span (once, either way)."""
    tokens = trace.tokens
    return [(i, 0, f"<b>pass key {escape(needle.answer)}</b> · token {i}<br>{token_hover(tokens[i])}",
             "" if low <= i < high else token_label(tokens[i]))
            for i in range(max(needle.start, 0), min(needle.end, len(tokens)))]


def needle_slot_points(trace: Trace, needle: NeedleSpan, stage: int) -> list[tuple]:
    """(x, y, hover, label) of each slot of a stage holding a pass-key token."""
    groups, cutoff, y = trace.slot_tokens[stage], trace.cutoffs[stage], -(stage + 1)
    parents = slot_parents(trace.slot_tokens, stage)
    points = []
    for slot in needle_slots(groups, needle):
        group = groups[slot]
        held = [p for p in group if needle.start <= p < needle.end]
        span = f"token {held[0]}" if len(held) == 1 else f"tokens {held[0]}–{held[-1]}"
        others = len(group) - len(held)
        alone = " (kept alone)" if len(parents[slot]) == 1 else \
            f" and {others} other token{'s' if others != 1 else ''}" if others else ""
        points.append((sum(group) / len(group), y,
                       f"<b>pass key {escape(needle.answer)}</b> · slot {slot} after layer {cutoff}<br>"
                       f"holds pass-key {span}{alone}<br>{token_hover(''.join(trace.tokens[p] for p in group))}", ""))
    return points


def needle_rings(trace: Trace, needle: NeedleSpan, low: int, high: int) -> go.Scatter:
    """The pass key's tokens and the slots holding them, ringed on top of the rows (legend: "pass key")."""
    points = needle_token_points(trace, needle, low, high)
    for stage in range(len(trace.slot_tokens)):
        points += needle_slot_points(trace, needle, stage)
    x, y, hover, text = (list(column) for column in zip(*points)) if points else ([], [], [], [])
    return go.Scatter(
        x=x, y=y, mode="markers+text", name="pass key", showlegend=True, text=text,
        textposition="top center", textfont=dict(size=10, color=NEEDLE_COLOR), hovertext=hover,
        hoverinfo="text", marker=dict(symbol="circle-open", size=17, color=NEEDLE_COLOR, line=dict(width=2.5)),
    )


# --------------------------------------------------------------------------------------------------------------------
# Shading, notes, the view and the axes
# --------------------------------------------------------------------------------------------------------------------


def row_extent(trace: Trace) -> tuple[float, float]:
    """The top and the bottom of the rows (the prompt's at 0, each stage one lower), with a margin."""
    return 0.75, -len(trace.slot_tokens) - 0.75


def shade_protected_spans(fig: go.Figure, trace: Trace) -> None:
    """A green band over each protected span, labelled with the setting that protects it."""
    top, bottom = row_extent(trace)
    for first, last, label in protected_spans(trace):
        fig.add_shape(type="rect", x0=first - 0.5, x1=last + 0.5, y0=bottom, y1=top, fillcolor=PROTECTED_FILL,
                      line=dict(width=0), layer="below")
        fig.add_annotation(x=(first + last) / 2, y=top, text=label, showarrow=False, yanchor="bottom",
                           font=dict(size=11, color="#2E7D32"))


def shade_needle(fig: go.Figure, trace: Trace, needle: NeedleSpan) -> None:
    """A red band over the pass key's tokens, labelled with the key."""
    top, bottom = row_extent(trace)
    fig.add_shape(type="rect", x0=needle.start - 0.5, x1=needle.end - 0.5, y0=bottom, y1=top,
                  fillcolor=NEEDLE_FILL, line=dict(width=0), layer="below")
    fig.add_annotation(x=(needle.start + needle.end - 1) / 2, y=top, text=f"pass key {escape(needle.answer)}",
                       showarrow=False, yanchor="bottom", font=dict(size=11, color=NEEDLE_COLOR))


def opening_view(n: int, low: int, start: int, window: int, needle: NeedleSpan | None) -> int:
    """The first position the view opens on: the detailed span's, or the needle's when it lies past the first
    window and no start was asked for."""
    if needle is not None and not low <= needle.start < low + window and start == 0:
        return max(0, min(needle.start - window // 4, n - window))  # open on the needle, not the first tokens
    return low


def note_missing_pairing(fig: go.Figure, trace: Trace, view_from: int, window: int) -> None:
    """Say, in the view, why there are no slots yet (a plan chosen at the cutoff) or at all (no cutoff)."""
    n = len(trace.tokens)
    if trace.plan_pending:
        fig.add_annotation(x=view_from + min(n, window) / 2, y=-0.6, showarrow=False,
                           text=f"{pending_why(trace)}: the pairing appears once the prompt has run")
    elif not trace.slot_tokens:
        fig.add_annotation(x=view_from + min(n, window) / 2, y=-0.6, showarrow=False,
                           text="no cutoff: the base model, nothing is merged")


def pairing_title(trace: Trace) -> str:
    """The prompt's length, then each stage's slots (or the layers a pending plan is chosen at)."""
    title = f"Token pairing · {len(trace.tokens)} prompt tokens"
    if trace.plan_pending:
        rounds = {c: trace.cutoffs.count(c) for c in trace.cutoffs}
        title += " → pairs chosen at layer " + ", ".join(
            f"{c} ({n} rounds)" if n > 1 else str(c) for c, n in rounds.items())
    for stage in range(len(trace.slot_tokens)):
        title += f" → {len(trace.slot_tokens[stage])} slots after {stage_name(trace, stage)}"
    return title


def stage_name(trace: Trace, stage: int) -> str:
    """'layer 12', or 'layer 12, round 2' where a layer merges again (groups)."""
    cutoff = trace.cutoffs[stage]
    merges = trace.cutoffs[:stage + 1].count(cutoff)
    return f"layer {cutoff}, round {merges}" if merges > 1 else f"layer {cutoff}"


def row_names(trace: Trace) -> list[str]:
    """The y axis's labels: the prompt's row, then each stage's (a layer merged again names its round)."""
    return [f"prompt<br>{len(trace.tokens)} tokens",
            *(f"after {stage_name(trace, stage)}<br>{len(groups)} slots"
              for stage, groups in enumerate(trace.slot_tokens))]


def lay_out_pairing(fig: go.Figure, trace: Trace, low: int, view_from: int, window: int,
                    needle: NeedleSpan | None) -> None:
    """Title, size, legend and axes: the view on `window` positions from `view_from`, a range slider for the rest
    of a long prompt, a row per stage."""
    n, stages = len(trace.tokens), len(trace.slot_tokens)
    top, bottom = row_extent(trace)
    fig.update_layout(
        title=dict(text=pairing_title(trace), x=0.01, font=dict(size=14)),
        template=PAGE_TEMPLATE, height=260 + 110 * max(stages, 1), margin=dict(l=90, r=30, t=60, b=40),
        dragmode="pan", hovermode="closest", showlegend=needle is not None,
        legend=dict(orientation="h", x=1.0, xanchor="right", y=1.0, yanchor="bottom"),
        # The same plan keeps the reader's pan and zoom when the figure is re-sent with the cosines filled in.
        uirevision=f"{n}:{trace.cutoffs}:{trace.settings.get('keep_start')}:{trace.settings.get('keep_end')}:"
                   f"{trace.settings.get('keep_recent')}:{low}:{view_from}",
    )
    fig.update_xaxes(range=[view_from - 1, view_from + min(n, window)],
                     title=dict(text="prompt position (drag or use the slider below)"),
                     rangeslider=dict(visible=n > window, thickness=0.08), zeroline=False, showgrid=False)
    fig.update_yaxes(tickvals=[-s for s in range(stages + 1)], ticktext=row_names(trace),
                     range=[bottom - 0.1, top + 0.45], fixedrange=True, zeroline=False, showgrid=False)
