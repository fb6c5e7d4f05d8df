"""python -m slerpviz.bench retrieval [--quick] [--model NAME | --shape ...] [--texts FILE] [--lengths ...] [...]

Writes DIR/retrieval.csv (one row per trial), retrieval_summary.csv, retrieval.json (machine, command, commit) and
retrieval.html (Plotly heatmaps, depth × length → accuracy, base and every variant side by side), and prints a
table with n beside every figure.

Does the answer survive the merge? Synthetic long-context retrieval, in the spirit of needle-in-a-haystack and RULER.
The prompts and their scoring are slerpviz.tasks' (the page shows the same prompts): filler prose with a needle at a
chosen depth and a question at the end. The base model and each merged variant continue the same prompt greedily; a
trial is correct when the exact answer appears in the continuation. This module runs the trials, sums them up,
reports them, and is the subcommand.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..engine import MergeSettings, MergingEngine, Sampling, Trace
from ..tasks import TASKS, Haystack, build_prompt, is_correct
from . import report, schedules
from .limits import Shape, prefill_flops
from .machine import machine_info
from .options import (build_engine, check_flags_taken, check_out, describe_model, float_list, given, int_list,
                      interpolation_options, listed, merge_options, merge_settings, model_options, run_options,
                      settings_label, subcommand, text_options, torch_threads, whole)
from .texts import read_texts

RETRIEVAL_COLUMNS = ("task", "length", "depth", "sample", "variant", "correct", "answer", "output",
                     "needle_start", "needle_end", "needle_merged", "prefill_s", "flop_limit", "merged_length")
SUMMARY_COLUMNS = ("task", "variant", "length", "depth", "n", "correct", "accuracy", "flop_limit", "prefill_s",
                   "needle_merged")


def new_tokens_for(answer: str) -> int:
    """Room for a space, one token per digit (the worst case) and a little slack."""
    return len(answer) + 4


# ----------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrievalPlan:
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    samples: int
    variants: tuple[tuple[str, MergeSettings], ...]  # (label, settings); base is always run first
    seed: int = 0


def greedy(engine: MergingEngine, ids: torch.Tensor, settings: MergeSettings, new_tokens: int) -> Trace:
    """The trace of the greedy continuation: its text, prefill seconds, the length each layer saw, the slots."""
    run = engine.start(ids.to(engine.device), settings, Sampling(max_new_tokens=new_tokens))
    for _ in run:
        pass
    return run.trace


def merged_share(trace: Trace, start: int, end: int) -> float:
    """Share of the prompt tokens [start, end) (the asked needle) that the last merge stage put in a slot with
    others: 0 where none of them merged."""
    if not trace.slot_tokens or end <= start:
        return 0.0
    merged = {token for slot in trace.slot_tokens[-1] if len(slot) > 1 for token in slot}
    return sum(token in merged for token in range(start, end)) / (end - start)


def task_list(text: str | None) -> tuple[str, ...]:
    """"passkey, multikey" -> ("passkey", "multikey"); None -> every task; an empty list is refused (it once meant every
    task). Checked by check_prompts."""
    if text is None:
        return TASKS
    tasks = tuple(t for t in text.replace(" ", "").split(",") if t)
    if not tasks:
        raise ValueError(f"an empty list ({text!r}): give at least one task, comma-separated, like "
                         f"{','.join(TASKS)}")
    return tasks


def check_prompts(engine: MergingEngine, tasks: tuple[str, ...], lengths: tuple[int, ...],
                  depths: tuple[float, ...]) -> None:
    """Refuse prompts that cannot be built or run: unknown tasks, depths outside [0, 1], lengths beyond the context."""
    context = getattr(engine.config, "max_position_embeddings", None)
    for length in lengths:
        if context is not None and length + 16 > context:
            raise ValueError(f"length {length} plus the answer does not fit the model's context of {context} tokens")
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    for depth in depths:
        if not 0 <= depth <= 1:
            raise ValueError(f"depth {depth!r} must be between 0 and 1")


def check_plan(engine: MergingEngine, plan: RetrievalPlan) -> None:
    """Refuse what cannot run before running anything: the prompts, then every variant's settings."""
    check_prompts(engine, plan.tasks, plan.lengths, plan.depths)
    for label, settings in plan.variants:
        engine.validate(min(plan.lengths), settings, Sampling(max_new_tokens=16))


def run_retrieval(engine: MergingEngine, haystack: Haystack, plan: RetrievalPlan, log=print) -> list[dict]:
    """One row per (prompt, variant): base first, then every merged variant on the very same prompt."""
    check_plan(engine, plan)
    for task in plan.tasks:  # a filler too short or a length too short fails now, not an hour in
        for length in plan.lengths:
            build_prompt(haystack, task, length, plan.depths[0], 0, plan.seed)
    shape = Shape.from_config(engine.config, engine.dtype)
    engine.warm_up()
    rows = []
    for task in plan.tasks:
        for length in plan.lengths:
            log(f"retrieval: {task} at {length} tokens, {len(plan.depths)} depths x {plan.samples} samples, "
                f"{1 + len(plan.variants)} variants")
            base_flops = prefill_flops(shape, [length] * engine.num_layers)
            for depth in plan.depths:
                for sample in range(plan.samples):
                    prompt = build_prompt(haystack, task, length, depth, sample, plan.seed)
                    for label, settings in (("base", MergeSettings()), *plan.variants):
                        trace = greedy(engine, prompt.ids, settings, new_tokens_for(prompt.answer))
                        lengths = trace.seq_len_per_layer
                        rows.append({
                            "task": task, "length": length, "depth": depth, "sample": sample, "variant": label,
                            "correct": int(is_correct(prompt.answer, trace.text)), "answer": prompt.answer,
                            "output": trace.text, "needle_start": prompt.needle_start,
                            "needle_end": prompt.needle_end,
                            "needle_merged": merged_share(trace, prompt.needle_start, prompt.needle_end),
                            "prefill_s": trace.prefill_s, "flop_limit": base_flops / prefill_flops(shape, lengths),
                            "merged_length": lengths[-1],
                        })
    return rows


def summarise(rows: list[dict], by: tuple[str, ...] = ("task", "variant", "length", "depth")) -> list[dict]:
    """Accuracy with its n for each group, in the order groups first appear."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in by), []).append(row)
    return [{
        **dict(zip(by, key)),
        "n": len(members),
        "correct": sum(r["correct"] for r in members),
        "accuracy": statistics.fmean(r["correct"] for r in members),
        "flop_limit": statistics.fmean(r["flop_limit"] for r in members),
        "prefill_s": statistics.median(r["prefill_s"] for r in members),
        "needle_merged": statistics.fmean(r.get("needle_merged", 0.0) for r in members),
    } for key, members in groups.items()]


def passkey_accuracy(rows: list[dict], variant: str, min_length: int = 0) -> tuple[int, int]:
    """(correct, n) of the pass-key trials of a variant at prompt lengths of at least `min_length`."""
    trials = [r for r in rows if r["task"] == "passkey" and r["variant"] == variant and r["length"] >= min_length]
    return sum(r["correct"] for r in trials), len(trials)


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


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------


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
                   help="add a named preset as a variant (see slerpviz.presets); repeatable. --method and "
                        "--positions still say how its slots are made, as for speed")
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

        # The preset replaces the merge flags; --method and --positions still apply (drop against merge, say).
        named = [dataclasses.replace(preset(name, layers), method=args.method, positions=args.positions)
                 for name in args.preset]
        variants = [*named, *(variants if args.cutoffs is not None else [])]
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


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """`python -m slerpviz.bench retrieval` with `argv` (the words after `retrieval`); `args`: already parsed."""
    args = args if args is not None else parser().parse_args(argv)
    with torch_threads(args, one_when_quick=True):
        try:
            check_out(args.out)
            check_flags_taken(args)
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
