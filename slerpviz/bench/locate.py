"""python -m slerpviz.bench locate [--quick] [--model NAME | --shape ...] [--texts FILE] [--lengths ...] [...]

Where can the `attention` choice see the answer? For the retrieval benchmark's prompts, the attention each token
receives from the last W prompt tokens at every layer of the unmerged model — what that choice would score at a
cutoff there — and where the needle's tokens rank in it. Writes DIR/locate.csv (one row per prompt and layer),
locate_summary.csv, locate.json (machine, command, commit) and locate.html (Plotly: layer -> the needle's rank, the
presets' cutoffs marked), and prints a table by layer with n beside it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import plotly.graph_objects as go
import torch

from ..engine import MergingEngine
from ..presets import PRESETS, preset
from ..tasks import TASKS, Haystack, Prompt, build_prompt
from . import report
from .machine import machine_info
from .options import (attention_window_option, build_engine, check_out, describe_model, float_list, int_list,
                      listed, model_options, run_options, subcommand, text_options, torch_threads, whole)
from .retrieval import check_prompts, task_list
from .texts import read_texts

LOCATE_COLUMNS = ("task", "length", "depth", "sample", "layer", "needle_tokens", "median_rank", "rank_share",
                  "found")
SUMMARY_COLUMNS = ("task", "length", "layer", "n", "rank_share", "found")
# The share of the prompt counted as "found": the presets' kept budget on a long prompt (attention_keep_share).
FOUND_SHARE = 1 / 16


def needle_ranks(scores: torch.Tensor, start: int, end: int) -> list[int]:
    """Rank of each token of [start, end) among all of `scores` [L], 0 for the most attended (ties: earlier first)."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return rank[start:end].tolist()


def locate_row(prompt: Prompt, layer: int, scores: torch.Tensor) -> dict:
    """One prompt at one layer: the needle's median rank, as a share of the prompt (0 = the most attended token,
    about 0.5 = a typical one), and the share of its tokens among the most attended sixteenth of the prompt."""
    ranks = needle_ranks(scores, prompt.needle_start, prompt.needle_end)
    median = statistics.median(ranks)
    return {"task": prompt.task, "length": prompt.length, "depth": prompt.depth, "sample": prompt.sample,
            "layer": layer, "needle_tokens": len(ranks), "median_rank": median, "rank_share": median / prompt.length,
            "found": sum(r < FOUND_SHARE * prompt.length for r in ranks) / len(ranks)}


def run_locate(engine: MergingEngine, haystack: Haystack, tasks: tuple[str, ...], lengths: tuple[int, ...],
               depths: tuple[float, ...], samples: int, window: int, seed: int = 0, log=print) -> list[dict]:
    rows = []
    for task in tasks:
        for length in lengths:
            log(f"locate: {task} at {length} tokens, {len(depths)} depths x {samples} samples")
            for depth in depths:
                for sample in range(samples):
                    prompt = build_prompt(haystack, task, length, depth, sample, seed)
                    by_layer = engine.attention_by_layer(prompt.ids, window)
                    rows += [locate_row(prompt, layer, scores) for layer, scores in enumerate(by_layer)]
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Means over the prompts of each task, length and layer, with their n."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["length"], row["layer"]), []).append(row)
    return [{"task": task, "length": length, "layer": layer, "n": len(members),
             "rank_share": statistics.fmean(r["rank_share"] for r in members),
             "found": statistics.fmean(r["found"] for r in members)}
            for (task, length, layer), members in groups.items()]


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def rank_figure(summary: list[dict], num_layers: int, key: str, title: str, axis: str) -> go.Figure:
    """Layer -> `key` for every task and length, with each preset's cutoffs on this model marked."""
    fig = go.Figure()
    for task, length in dict.fromkeys((r["task"], r["length"]) for r in summary):
        cells = sorted((r for r in summary if (r["task"], r["length"]) == (task, length)), key=lambda r: r["layer"])
        fig.add_trace(go.Scatter(
            x=[r["layer"] for r in cells], y=[r[key] for r in cells], mode="lines+markers",
            name=f"{task}, {length} tokens (n = {cells[0]['n']})",
            hovertemplate=f"{task}, {length} tokens<br>cutoff at layer %{{x}}: %{{y:.3f}}<extra></extra>"))
    cutting: dict[int, list[str]] = {}  # layer -> the presets with a cutoff there
    for name in PRESETS:
        for cutoff in preset(name, num_layers).cutoffs:
            cutting.setdefault(cutoff, []).append(name)
    for cutoff, names in sorted(cutting.items()):
        fig.add_vline(x=cutoff, line=dict(width=1, dash="dot", color="#999"))
        fig.add_annotation(x=cutoff, y=1, yref="paper", text=", ".join(names), showarrow=False, textangle=-90,
                           xanchor="left", yanchor="top", font=dict(size=10, color="#666"))
    fig.update_layout(title=title, template="plotly_white", height=460, xaxis_title="cutoff layer",
                      yaxis_title=axis, legend=dict(orientation="h", y=-0.2))
    return fig


def layer_table(summary: list[dict]) -> str:
    """One row per layer; per task and length the needle's rank share and found share."""
    keys = list(dict.fromkeys((r["task"], r["length"]) for r in summary))
    lookup = {(r["task"], r["length"], r["layer"]): r for r in summary}
    rows = [{"layer": layer, **{f"{task} {length}": f"{lookup[(task, length, layer)]['rank_share']:.3f} / "
                                                   f"{lookup[(task, length, layer)]['found']:.2f}"
                                for task, length in keys}}
            for layer in sorted({r["layer"] for r in summary})]
    n = {f"{task} {length}": lookup[(task, length, 0)]["n"] for task, length in keys}
    return report.format_table(rows, [("layer", "layer", "")] + [
        (column, f"{column} (n={n[column]}): rank / found", "") for column in n])


def write_report(out: Path, rows: list[dict], machine: dict, model: dict, plan: dict, num_layers: int) -> str:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    report.write_csv(out / "locate.csv", rows, LOCATE_COLUMNS)
    report.write_csv(out / "locate_summary.csv", summary, SUMMARY_COLUMNS)
    report.write_json(out / "locate.json", {"benchmark": "locate", "machine": machine, "model": model, "plan": plan,
                                            "summary": summary, "rows": rows})
    notes = ["For each prompt of the retrieval benchmark (base model, no merge): the attention each token receives "
             f"from the last {plan['window']} prompt tokens at every layer — what the attention choice scores at a "
             "cutoff there — and where the asked needle's tokens rank in it. Rank share: the needle's median rank "
             "÷ the prompt's length (0 = the most attended token, about 0.5 = a typical one); found: the share of "
             f"its tokens among the most attended 1/{round(1 / FOUND_SHARE)} of the prompt (the presets' kept "
             "budget on a long prompt). Dotted lines: each preset's cutoffs on this model."]
    report.write_html(out / "locate.html", f"slerpviz locate: {model['name']}", machine, [
        rank_figure(summary, num_layers, "rank_share", "Where the needle ranks in the attention score, by layer "
                    "(lower is seen better)", "needle's median rank ÷ prompt length"),
        rank_figure(summary, num_layers, "found", f"Share of the needle among the most attended "
                    f"1/{round(1 / FOUND_SHARE)} of the prompt, by layer", "found"),
    ], notes)
    return layer_table(summary)


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------


def parser(add_parser=None) -> argparse.ArgumentParser:
    p = subcommand("locate", __doc__.split("\n\n")[1], [
        model_options("random weights (tiny: for tests; ranks mean nothing)", "keys, needle words and filler offsets"),
        run_options("a small run: under a minute on a 2-core CPU"),
        text_options("filler: "),
    ], add_parser, summary="where can the attention choice see the answer? The needle's rank, layer by layer")
    p.add_argument("--tasks", type=listed, help=f"comma-separated: {', '.join(TASKS)} (default: both)")
    p.add_argument("--lengths", type=listed, help="prompt lengths in tokens (default 1024,2048; --quick 256,512)")
    p.add_argument("--depths", type=listed, help="needle depths, shares of the filler (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--samples", type=whole(1), help="prompts per length and depth (default 4: 20 per length)")
    attention_window_option(p)
    return p


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """`python -m slerpviz.bench locate` with `argv` (the words after `locate`); `args`: already parsed."""
    args = args if args is not None else parser().parse_args(argv)
    with torch_threads(args, one_when_quick=True):
        try:
            check_out(args.out)
            tasks = task_list(args.tasks)
            lengths = (int_list(args.lengths) if args.lengths is not None
                       else (256, 512) if args.quick else (1024, 2048))
            depths = float_list(args.depths, "depth") if args.depths is not None else (
                (0.0, 0.5, 1.0) if args.quick else (0.0, 0.25, 0.5, 0.75, 1.0))
            samples = args.samples or (2 if args.quick else 4)
            engine, name = build_engine(args)
            check_prompts(engine, tasks, lengths, depths)
            haystack = Haystack(engine.tokenizer, [text for _, text in read_texts(args.texts)])
            began = time.perf_counter()
            rows = run_locate(engine, haystack, tasks, lengths, depths, samples, args.attention_window, args.seed,
                              log=lambda m: print(m, file=sys.stderr))
            machine, model = machine_info(engine.device, ["locate", *(argv or [])]), describe_model(engine, name)
        except (ValueError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    plan = {"tasks": tasks, "lengths": lengths, "depths": depths, "samples": samples,
            "window": args.attention_window, "seed": args.seed, "found_share": FOUND_SHARE}
    print(f"locate on {machine['gpu'] or machine['cpu']} ({machine['device']}), model {name}, "
          f"{time.perf_counter() - began:.0f} s")
    print(write_report(args.out, rows, machine, model, plan, engine.num_layers))
    print(f"\nwrote {args.out / 'locate.csv'}, locate_summary.csv, locate.json, locate.html")
    return 0
