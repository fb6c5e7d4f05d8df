"""python -m slerpviz.bench retrieval [--quick] [--model NAME | --shape ...] [--texts FILE] [--lengths ...] [...]

Writes DIR/retrieval.csv (one row per trial), retrieval_summary.csv, retrieval.json (machine, command, commit) and
retrieval.html (Plotly heatmaps, depth × length → accuracy, base and every variant side by side), and prints a
table with n beside every figure.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..tasks import TASKS, Haystack
from . import report, schedules
from .machine import machine_info
from .options import (build_engine, check_out, describe_model, float_list, given, int_list, interpolation_options,
                      listed, merge_options, merge_settings, model_options, run_options, settings_label, subcommand,
                      text_options, torch_threads, whole)
from .retrieval import RETRIEVAL_COLUMNS, SUMMARY_COLUMNS, RetrievalPlan, run_retrieval, summarise, task_list
from .texts import read_texts


def parser(add_parser=None) -> argparse.ArgumentParser:
    """Its own options on the shared ones of .options; `add_parser`: as a subcommand of python -m slerpviz.bench."""
    p = subcommand("retrieval", __doc__.split("\n\n")[1], [
        model_options("random weights (tiny: for tests; accuracy means nothing)",
                      "keys, needle words and filler offsets"),
        run_options("a small run: under three minutes on a 2-core CPU"),
        text_options("filler: "),
        merge_options("merged variants, comma-separated schedules: 15,22,7+15 (default: N/2 and 3N/4; --quick N/2)"),
        interpolation_options("every merged variant"),
    ], add_parser, summary="pass-key and multi-key retrieval: does the answer survive the merge?")
    p.add_argument("--tasks", type=listed, help=f"comma-separated: {', '.join(TASKS)} (default: both)")
    p.add_argument("--lengths", type=listed,
                   help="prompt lengths in tokens (default 512,1024,2048,4096 within the context; --quick 256,384)")
    p.add_argument("--depths", type=listed, help="needle depths, shares of the filler (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--samples", type=whole(1), help="prompts per length and depth (default 4: 20 per length)")
    p.add_argument("--preset", type=given, action="append", default=[],
                   help="add a named preset as a variant (see slerpviz.presets); repeatable")
    return p


def retrieval_plan(args, engine) -> RetrievalPlan:
    layers = engine.num_layers
    context = getattr(engine.config, "max_position_embeddings", None)
    if args.lengths is not None:
        lengths = int_list(args.lengths)
    else:
        lengths = (256, 384) if args.quick else (512, 1024, 2048, 4096)
        skipped = [n for n in lengths if context is not None and n + 16 > context]
        if skipped:
            print(f"note: skipping lengths {skipped}: beyond the model's context of {context} tokens", file=sys.stderr)
        lengths = tuple(n for n in lengths if n not in skipped)
    chosen = schedules.parse(args.cutoffs) if args.cutoffs is not None else (
        [(layers // 2,)] if args.quick else [(layers // 2,), (3 * layers // 4,)])
    schedules.check(chosen, layers)
    variants = [merge_settings(args, s) for s in chosen]
    if args.preset:
        from ..presets import preset

        variants = [*(preset(name, layers) for name in args.preset), *(variants if args.cutoffs is not None else [])]
    tasks = task_list(args.tasks)
    return RetrievalPlan(
        tasks=tasks,
        lengths=lengths,
        depths=float_list(args.depths, "depth") if args.depths is not None else (
            (0.0, 0.5, 1.0) if args.quick else (0.0, 0.25, 0.5, 0.75, 1.0)),
        samples=args.samples or (2 if args.quick else 4),
        variants=tuple((settings_label(s), s) for s in variants),
        seed=args.seed,
    )


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def wrapped(label: str, width: int = 32) -> str:
    """A long variant label on several lines (at its commas), so side-by-side titles do not run into each other."""
    lines, line = [], ""
    for part in label.split(", "):
        if line and len(line) + 2 + len(part) > width:
            lines.append(line + ",")
            line = part
        else:
            line = f"{line}, {part}" if line else part
    return "<br>".join([*lines, line])


def heatmaps(summary: list[dict], task: str) -> go.Figure:
    """Depth × length → accuracy for base and every variant side by side, each cell labelled correct/n."""
    cells = [r for r in summary if r["task"] == task]
    variants = list(dict.fromkeys(r["variant"] for r in cells))
    lengths = sorted({r["length"] for r in cells})
    depths = sorted({r["depth"] for r in cells})
    fig = make_subplots(rows=1, cols=len(variants), subplot_titles=[wrapped(v) for v in variants],
                        shared_yaxes=True, horizontal_spacing=0.03)
    for col, variant in enumerate(variants, start=1):
        lookup = {(r["depth"], r["length"]): r for r in cells if r["variant"] == variant}
        z = [[lookup[(d, n)]["accuracy"] if (d, n) in lookup else None for n in lengths] for d in depths]
        text = [[f"{lookup[(d, n)]['correct']}/{lookup[(d, n)]['n']}" if (d, n) in lookup else "" for n in lengths]
                for d in depths]
        fig.add_trace(go.Heatmap(
            z=z, x=[str(n) for n in lengths], y=[f"{d:g}" for d in depths], text=text, texttemplate="%{text}",
            zmin=0, zmax=1, colorscale="RdYlGn", showscale=col == len(variants),
            colorbar=dict(title="accuracy"),
            hovertemplate=f"{variant}<br>length %{{x}}, depth %{{y}}<br>%{{text}} correct<extra></extra>",
        ), row=1, col=col)
        fig.update_xaxes(title_text="prompt length (tokens)", type="category", row=1, col=col)
    fig.update_yaxes(title_text="needle depth (0 = start)", type="category", autorange="reversed", row=1, col=1)
    title_lines = max(wrapped(v).count("<br>") + 1 for v in variants)  # the subplot titles stack upward
    fig.update_layout(title=dict(text=f"{task}: does the answer survive the merge? (accuracy, correct/n per cell)",
                                 yref="container", y=1, yanchor="top", pad=dict(t=12)),
                      template="plotly_white", height=340 + 22 * title_lines, margin=dict(t=60 + 22 * title_lines),
                      width=max(520, 300 * len(variants) + 120))
    return fig


SUMMARY_TABLE = [("task", "task", ""), ("variant", "variant", ""), ("length", "length", ""),
                 ("score", "correct/n", ""), ("accuracy", "accuracy", ".2f"), ("flop_limit", "FLOP limit", ".2f"),
                 ("prefill_s", "prefill s", ".2f")]


def write_report(out: Path, rows: list[dict], plan: RetrievalPlan, machine: dict, model: dict) -> str:
    out.mkdir(parents=True, exist_ok=True)
    cells = summarise(rows)
    by_length = [{**r, "score": f"{r['correct']}/{r['n']}"} for r in summarise(rows, ("task", "variant", "length"))]
    report.write_csv(out / "retrieval.csv", rows, RETRIEVAL_COLUMNS)
    report.write_csv(out / "retrieval_summary.csv", cells + by_length, SUMMARY_COLUMNS)
    report.write_json(out / "retrieval.json", {
        "benchmark": "retrieval", "machine": machine, "model": model,
        "plan": {**asdict(plan), "variants": [{"label": label, **asdict(s)} for label, s in plan.variants]},
        "by_length": by_length, "cells": cells, "rows": rows,
    })
    notes = ["Each prompt is filler prose with a needle at the given depth and a question at the end; a trial is "
             "correct when the exact answer appears in the greedy continuation. Base and every merged variant run "
             "on the very same prompts. FLOP limit: base prefill FLOPs ÷ merged, from the config and the lengths "
             "each layer saw."]
    report.write_html(out / "retrieval.html", f"slerpviz retrieval: {model['name']}", machine,
                      [heatmaps(cells, task) for task in plan.tasks], notes)
    return report.format_table(by_length, SUMMARY_TABLE)


def retrieval_main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """`python -m slerpviz.bench retrieval` with `argv` (the words after `retrieval`); `args`: already parsed."""
    args = args if args is not None else parser().parse_args(argv)
    with torch_threads(args, one_when_quick=True):
        try:
            check_out(args.out)
            engine, name = build_engine(args)
            plan = retrieval_plan(args, engine)
            haystack = Haystack(engine.tokenizer, [text for _, text in read_texts(args.texts)])
            began = time.perf_counter()
            rows = run_retrieval(engine, haystack, plan, log=lambda m: print(m, file=sys.stderr))
            # Read while --threads is still in force, so the report names the threads the run used.
            machine, model = machine_info(engine.device, ["retrieval", *(argv or [])]), describe_model(engine, name)
        except (ValueError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    print(f"retrieval on {machine['gpu'] or machine['cpu']} ({machine['device']}), model {name}, "
          f"{time.perf_counter() - began:.0f} s")
    print(write_report(args.out, rows, plan, machine, model))
    print(f"\nwrote {args.out / 'retrieval.csv'}, retrieval_summary.csv, retrieval.json, retrieval.html")
    return 0

