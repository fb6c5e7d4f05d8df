"""The pictures: pure functions from the engine's Trace to Plotly figures.

Nothing here touches a model. Every figure is drawn from what a Trace records (the plan, the shapes per layer, the
timings), so the page, the API and the tests all see the same picture for the same trace.

Here: the page's look (its colours, template and PageFigure) and the figures per layer and per token: sequence
length and attention cost, per-token latency, KV cache. The token-pairing plot has its own module,
`slerpviz.app.pairing`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots
from plotly.utils import PlotlyJSONEncoder

from ..engine import Trace

BASE_COLOR = "#4C78A8"
MERGED_COLOR = "#F58518"

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


# --------------------------------------------------------------------------------------------------------------------
# Sequence length and attention cost per layer
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
# Per-token latency, KV cache per layer
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
