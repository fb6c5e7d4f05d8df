"""Writing results: CSV for tables, JSON for everything (machine included), an interactive Plotly HTML report, and
a short plain-text table for the terminal; and what the speed and fidelity reports draw and print (their figures,
speed's table and definitions, the name of a fidelity variant), which their modules write."""

from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

COLORS = qualitative.Plotly + qualitative.D3


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: _csv_value(row.get(k)) for k in columns} for row in rows)


def _csv_value(value):
    if value is None:
        return ""  # an empty cell: not measured on this device (say, peak memory without a counter)
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")


def write_html(path: Path, title: str, machine: dict, figures: list[go.Figure], notes: list[str]) -> None:
    """One self-contained page (plotly.js inlined: it opens offline)."""
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figures)]
    keys = ("cpu", "gpu", "device", "torch_threads", "torch", "platform", "load_average")
    where = ", ".join(f"{k}: {machine[k]}" for k in keys if machine.get(k) is not None)
    body = "\n".join([
        f"<h1>{html.escape(title)}</h1>",
        f"<p><b>Machine</b>: {html.escape(where)}<br><b>Command</b>: <code>{html.escape(machine.get('command', ''))}"
        f"</code> ({html.escape(str(machine.get('utc', '')))})</p>",
        *(f"<p>{html.escape(n)}</p>" for n in notes),
        *parts,
    ])
    path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
                    f"<body style='font-family:sans-serif;max-width:1400px;margin:auto'>{body}</body></html>",
                    encoding="utf-8")


def write_png(html_path: Path, png_path: Path, width: int = 1400) -> None:
    """A picture of an HTML report (for a README), rendered by Debian's chromium through playwright: plotly's own
    image export needs kaleido, which this project does not install."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium")
        try:
            page = browser.new_page(viewport={"width": width, "height": 800})
            page.goto(Path(html_path).resolve().as_uri())
            page.wait_for_selector(".plot-container")
            page.wait_for_timeout(500)
            page.screenshot(path=str(png_path), full_page=True)
        finally:
            browser.close()


# ----------------------------------------------------------------------------------------------------------------
# Plain-text tables
# ----------------------------------------------------------------------------------------------------------------


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec). Missing values print as '-'; text is left-aligned, numbers right."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([_format(row.get(key), spec) for key, _, spec in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    textual = [all(isinstance(row.get(key), str) for row in rows) for key, _, _ in columns]
    lines = ["  ".join(c.ljust(w) if left else c.rjust(w) for c, w, left in zip(r, widths, textual)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _format(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec) if spec else str(value)


# ----------------------------------------------------------------------------------------------------------------
# Speed: its table, its definitions and its figure
# ----------------------------------------------------------------------------------------------------------------

SPEED_PANELS = (
    # (mode, measured key, limit key, title)
    ("cached", "ttft_speedup", "ttft_speedup_limit", "Time to first token, with KV cache: base ÷ merged"),
    ("cached", "decode_speedup", "decode_speedup_limit", "Decode per token, with KV cache: base ÷ merged"),
    ("recompute", "ttft_speedup", "ttft_speedup_limit", "Time to first token, no cache (article): base ÷ merged"),
    ("recompute", "decode_speedup", "decode_speedup_limit", "Decode per token, no cache (article): base ÷ merged"),
    ("recompute", "decode_speedup_vs_base_cached", None,
     "Decode per token: base WITH cache ÷ merged without cache (the honest baseline)"),
    ("cached", "ttft_achieved_over_limit", None, "Time to first token with cache: achieved ÷ limit"),
    ("cached", "kv_fraction", "kv_fraction_limit", "KV-cache bytes: merged ÷ base"),
    ("cached", "merge_share", None, "The merge itself, as a share of the merged prefill"),
)


SPEED_TABLE = [
    ("length", "len", ""), ("schedule", "cutoff", ""), ("mode", "mode", ""), ("decode", "decode", ""),
    ("prefill", "prefill", ""),
    ("base_ttft_s", "TTFT base s", ".3f"), ("merged_ttft_s", "merged s", ".3f"), ("ttft_speedup", "x", ".2f"),
    ("ttft_speedup_limit", "limit", ".2f"), ("ttft_achieved_over_limit", "x/limit", ".2f"),
    ("base_decode_ms", "decode base ms", ".1f"), ("merged_decode_ms", "merged ms", ".1f"),
    ("decode_speedup", "x", ".2f"), ("decode_speedup_limit", "limit", ".2f"),
    ("decode_speedup_vs_base_cached", "x vs cached base", ".2f"),
    ("kv_fraction", "KV frac", ".3f"), ("kv_fraction_limit", "limit", ".3f"), ("merge_share", "merge share", ".1%"),
    ("merge_ms", "merge ms", ".2f"), ("merge_gpu_ms", "kernels ms", ".2f"), ("merge_syncs", "syncs", ""),
    ("merge_ops_per_stage", "ops/stage", ".0f"), ("merged_decode_syncs", "decode syncs", ""),
    ("base_prefill_ops", "prefill ops base", ""), ("merged_prefill_ops", "merged", ""),
]


def speed_notes(rows: list[dict]) -> list[str]:
    """The speed report's notes: what its ratios and limits are, and how peak memory was measured."""
    return [
        "Speed-ups are base time ÷ merged time (above 1 = merged is faster); medians over interleaved repeats. "
        "Limits come from the config: FLOPs for prefill and for decoding without cache, bytes read per step for "
        "cached decoding. 'cached' compares base with KV cache against merged with its shorter cache; 'recompute' "
        "is the article's setting: base without cache against merged re-merging every step.",
        f"Peak memory: {memory_note(rows)}",
    ]


def memory_note(rows: list[dict]) -> str:
    """How peak memory was measured on this device."""
    kind = rows[0]["peak_mem_kind"] if rows else None
    if kind == "cuda_allocated":
        return "torch.cuda.max_memory_allocated above the start of each run."
    if kind == "cpu_rss_delta":
        return ("on CPU PyTorch has no allocator counter; the figure is the rise in the process's peak resident "
                "set during the run, which undercounts memory the C allocator reuses. Treat it as a rough guide.")
    return "not measurable on this device; the columns are empty."


SPEED_DEFINITIONS = {
    "ttft_speedup": "base time to first token ÷ merged (prefill + choosing the first token)",
    "ttft_speedup_limit": "base prefill FLOPs ÷ merged prefill FLOPs from the config",
    "decode_speedup": "base median seconds per decode step ÷ merged",
    "decode_speedup_limit": "cached: bytes read per step (weights + KV cache), base ÷ merged; "
                            "recompute: FLOPs of re-running the grown prompt, base ÷ merged",
    "decode_speedup_vs_base_cached": "base WITH cache decode time ÷ this row's merged decode time",
    "kv_fraction": "merged KV-cache bytes after the prefill ÷ base",
    "kv_fraction_limit": "sum of per-layer cache lengths, merged ÷ base, from the plan",
    "merge_share": "seconds of planning + pair cosines + interpolation + slot positions ÷ merged time to first token",
    "merge_gpu_ms": "one merge's kernels, summed device time (torch.profiler; GPU only)",
    "merge_kernels": "kernels and copies one merge launches on the GPU (torch.profiler; GPU only)",
    "merge_syncs": "host syncs in one merge: scalar reads, data-dependent shapes, copies to the CPU (bench/ops.py)",
    "merge_ops_per_stage": "aten ops one merge dispatches (TorchDispatchMode, nested calls not counted) ÷ stages, "
                           "eager: a compiled merge shows in merged_prefill_ops",
    "base_decode_syncs": "host syncs in one cached decode step of base, the sampler's token read not included",
    "merged_decode_syncs": "the same for the merged variant",
    "base_decode_ops": "aten ops one cached decode step of base dispatches",
    "merged_decode_ops": "the same for the merged variant",
    "base_prefill_ops": "aten ops one cached prefill of base dispatches on this row's path (a compiled layer's fused "
                        "kernels are not dispatched: only what inductor left to aten, matmuls and attention)",
    "merged_prefill_ops": "the same for the merged variant, its merges included",
    "base_prefill_syncs": "scalar reads and data-dependent shapes among those ops (copies to the host not counted)",
    "merged_prefill_syncs": "the same for the merged variant",
    "base_prefill_kernels": "kernels and copies one prefill of base launches on the GPU (torch.profiler; GPU only)",
    "merged_prefill_kernels": "the same for the merged variant",
    "prefill": "eager, or compiled: each decoder layer and merge of the prompt through torch.compile, base and "
               "merged alike",
    "peak_mem_bytes": "see peak_mem_kind: cuda_allocated (exact) or cpu_rss_delta (rough); empty = not measurable",
}


def speed_figure(rows: list[dict]) -> go.Figure:
    """Measured ratio (solid) beside the config's limit (dashed, same colour), against prompt length."""
    fig = make_subplots(rows=4, cols=2, subplot_titles=[p[3] for p in SPEED_PANELS], vertical_spacing=0.07)
    all_lengths = sorted({r["length"] for r in rows})
    schedules = list(dict.fromkeys(r["schedule"] for r in rows))
    for index, (mode, key, limit_key, _) in enumerate(SPEED_PANELS):
        row, col = index // 2 + 1, index % 2 + 1
        for color, schedule in zip(COLORS, schedules):
            points = sorted((r for r in rows if r["mode"] == mode and r["schedule"] == schedule),
                            key=lambda r: r["length"])
            if not points:
                continue
            lengths = [r["length"] for r in points]
            hover = [_speed_hover(r, key, limit_key) for r in points]
            fig.add_trace(go.Scatter(
                x=lengths, y=[r[key] for r in points], mode="lines+markers", name=f"cutoff {schedule}",
                legendgroup=schedule, showlegend=index == 0, line=dict(color=color), hovertext=hover,
                hoverinfo="text"), row=row, col=col)
            if limit_key:
                fig.add_trace(go.Scatter(
                    x=lengths, y=[r[limit_key] for r in points], mode="lines", name=f"limit {schedule}",
                    legendgroup=schedule, showlegend=False, line=dict(color=color, dash="dash"),
                    hovertext=[f"limit from config: {r[limit_key]:.3f}" for r in points], hoverinfo="text"),
                    row=row, col=col)
        fig.update_xaxes(type="log", title_text="prompt tokens", tickvals=all_lengths, row=row, col=col)
        if key not in ("kv_fraction", "merge_share"):  # a ratio of 1: no faster, or exactly the limit
            fig.add_hline(y=1, line=dict(color="grey", width=1), row=row, col=col)
        if key == "merge_share":
            fig.update_yaxes(tickformat=".1%", row=row, col=col)
    fig.update_layout(height=1600, title="Speed: measured (solid) and the limit from the config (dashed)",
                      hovermode="closest", legend_title_text="schedule")
    return fig


def _speed_hover(row: dict, key: str, limit_key: str | None) -> str:
    text = f"{row['schedule']} @ {row['length']} tokens ({row['mode']})<br>{key}: {_format(row[key], '.3f')}"
    if limit_key:
        text += f"<br>limit: {_format(row[limit_key], '.3f')}"
    return text


# ----------------------------------------------------------------------------------------------------------------
# Fidelity: the name of a variant and the figures
# ----------------------------------------------------------------------------------------------------------------

def variant_label(row: dict) -> str:
    """slerp/mean, with /similar or /proportional added when they are not the defaults."""
    extra = ([row["choice"]] if row.get("choice", "consecutive") != "consecutive" else []) + (
        ["proportional"] if row.get("proportional") else [])
    return "/".join([row["method"], row["positions"], *extra])


FIDELITY_PANELS = (
    ("top1", "Top-1 agreement with base"),
    ("top5", "Base top-1 within merged top-5"),
    ("kl_mean", "KL(base ‖ merged), nats (log scale)"),
    ("tokens_to_divergence_mean", "Greedy tokens until first difference"),
)


def fidelity_figure(summary: list[dict]) -> go.Figure:
    """Agreement against cutoff, one line per variant (single-stage schedules): colour = method, dash = positions,
    marker = pair choice / proportional attention. Like the article's figure, but against the base model."""
    fig = make_subplots(rows=2, cols=2, subplot_titles=[p[1] for p in FIDELITY_PANELS])
    singles = [r for r in summary if r["stages"] == 1]
    variants = list(dict.fromkeys(variant_label(r) for r in singles))
    color = _style(r["method"] for r in singles)(COLORS)
    dash = _style(r["positions"] for r in singles)(("solid", "dot", "dash", "dashdot", "longdash"))
    marker = _style((r.get("choice"), r.get("proportional")) for r in singles)(
        ("circle", "square", "diamond", "x", "triangle-up", "star"))
    for index, (key, _) in enumerate(FIDELITY_PANELS):
        row, col = index // 2 + 1, index % 2 + 1
        for variant in variants:
            points = sorted((r for r in singles if variant_label(r) == variant), key=lambda r: r["first_cutoff"])
            first = points[0]
            fig.add_trace(go.Scatter(
                x=[r["first_cutoff"] for r in points], y=[r[key] for r in points], mode="lines+markers",
                name=variant, legendgroup=variant, showlegend=index == 0,
                line=dict(color=color[first["method"]], dash=dash[first["positions"]]),
                marker=dict(symbol=marker[(first.get("choice"), first.get("proportional"))]),
                hovertext=[f"{variant}, cutoff {r['schedule']}: {key} {r[key]:.3g} (n={r['samples']})"
                           for r in points], hoverinfo="text"), row=row, col=col)
        fig.update_xaxes(title_text="cutoff layer", row=row, col=col)
    fig.update_yaxes(range=[-0.02, 1.02], row=1, col=1)
    fig.update_yaxes(range=[-0.02, 1.02], row=1, col=2)
    fig.update_yaxes(type="log", row=2, col=1)
    fig.update_layout(height=900, title="Fidelity by cutoff: merged against the base model",
                      legend_title_text="method / positions")
    return fig


def _style(values):
    """A mapping from each distinct value, in order of appearance, to the next of a cycle of styles."""
    distinct = list(dict.fromkeys(values))
    return lambda styles: {v: styles[i % len(styles)] for i, v in enumerate(distinct)}


def fidelity_heatmap(by_prefix: list[dict], variant: str) -> go.Figure:
    """Top-1 agreement by cutoff and prefix length for one variant (the article's first figure)."""
    points = [r for r in by_prefix if r["stages"] == 1]
    cutoffs = sorted({r["first_cutoff"] for r in points})
    prefixes = sorted({r["prefix"] for r in points})
    value = {(r["first_cutoff"], r["prefix"]): r["top1"] for r in points}
    fig = go.Figure(go.Heatmap(
        x=[str(c) for c in cutoffs], y=[str(p) for p in prefixes], zmin=0, zmax=1, colorscale="Viridis",
        z=[[value.get((c, p)) for c in cutoffs] for p in prefixes], colorbar=dict(title="top-1"),
        hovertemplate="cutoff %{x}, prefix %{y} tokens: top-1 %{z:.2f}<extra></extra>"))
    fig.update_layout(title=f"Top-1 agreement by cutoff and prefix length ({variant})",
                      xaxis_title="cutoff layer", yaxis_title="prefix tokens", height=500)
    return fig
