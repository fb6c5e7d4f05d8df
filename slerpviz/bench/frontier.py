"""The speed × fidelity frontier: which tokens to merge, not just where.

For every setting of a grid (cutoff × merge ratio × pair choice × proportional attention) this measures, in one
run, the prefill speed-up over the base model (interleaved base / merged timings, medians) and the fidelity of the
merged next token on the default texts (top-1, KL, tokens until greedy continuations differ). The Pareto front of
speed-up against top-1 agreement tells which settings are worth using; the article's setting (all pairs, one cutoff,
consecutive) is drawn beside it for comparison.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import plotly.graph_objects as go
import torch
from transformers import DynamicCache

from ..engine import MergeSettings, MergingEngine
from .fidelity import TokenText, base_reference, compare, usable_prefixes
from .limits import Shape, prefill_flops

FRONTIER_COLUMNS = (
    "cutoffs", "ratio", "choice", "proportional", "method", "positions", "article",
    "prefill_speedup", "prefill_speedup_limit", "achieved_over_limit", "merged_length", "base_prefill_s",
    "merged_prefill_s", "samples", "top1", "top5", "kl_mean", "tokens_to_divergence_mean", "on_front",
)


@dataclass(frozen=True)
class FrontierPlan:
    settings: tuple[MergeSettings, ...]
    prefixes: tuple[int, ...]  # fidelity is measured at these prompt lengths
    speed_length: int  # prefill is timed at this prompt length
    repeats: int
    continuation: int


def default_grid(num_layers: int, quick: bool, method: str = "slerp", positions: str = "mean",
                 ) -> tuple[MergeSettings, ...]:
    """Cutoffs at fixed shares of the depth × ratios × {consecutive, uniform, similar, similar + proportional}."""
    shares = (0.25, 0.5) if quick else (0.07, 0.14, 0.25, 0.37, 0.5, 0.75)
    ratios = (0.5, 1.0) if quick else (0.25, 0.5, 0.75, 1.0)
    variants = (("consecutive", False), ("similar", True)) if quick else (
        ("consecutive", False), ("uniform", False), ("similar", False), ("similar", True))
    cutoffs = sorted({max(1, round(share * num_layers)) for share in shares})
    return tuple(
        MergeSettings(cutoffs=(cutoff,), method=method, positions=positions, ratio=ratio, choice=choice,
                      proportional=proportional)
        for cutoff in cutoffs for ratio in ratios for choice, proportional in variants
    )


def is_article_setting(settings: MergeSettings) -> bool:
    return (len(settings.cutoffs) == 1 and settings.ratio == 1.0 and settings.choice == "consecutive"
            and not settings.proportional)


# ----------------------------------------------------------------------------------------------------------------
# Speed: prefill, base and merged interleaved
# ----------------------------------------------------------------------------------------------------------------


def timed_prefill(engine: MergingEngine, ids: torch.Tensor, settings: MergeSettings) -> tuple[float, list[int]]:
    """Seconds for one cached prefill (merge included), and the sequence length each layer saw."""
    cache = DynamicCache(config=engine.config)
    engine.sync()
    began = time.perf_counter()
    _, layout, _ = engine.prefill(ids, None, settings, cache)
    engine.sync()
    seconds = time.perf_counter() - began
    lengths = [layer.get_seq_length() for layer in cache.layers]
    del layout, cache
    return seconds, lengths


def measure_speed(engine: MergingEngine, ids: torch.Tensor, settings: tuple[MergeSettings, ...], repeats: int,
                  log=print) -> list[dict]:
    """Base and each merged setting timed in turn (base, merged, base, merged ...), repeated; medians."""
    shape = Shape.from_config(engine.config, engine.decoder.embed_tokens.weight.dtype)
    timed_prefill(engine, ids, MergeSettings())  # warm-up, not counted
    base_times: dict[int, list[float]] = {i: [] for i in range(len(settings))}
    merged_times: dict[int, list[float]] = {i: [] for i in range(len(settings))}
    lengths: dict[int, list[int]] = {}
    base_lengths: list[int] = []
    for repeat in range(repeats):
        log(f"frontier speed: repeat {repeat + 1} of {repeats}, {len(settings)} settings at {ids.shape[-1]} tokens")
        for index, setting in enumerate(settings):
            seconds, base_lengths = timed_prefill(engine, ids, MergeSettings())
            base_times[index].append(seconds)
            seconds, lengths[index] = timed_prefill(engine, ids, setting)
            merged_times[index].append(seconds)
    base_flops = prefill_flops(shape, base_lengths)
    rows = []
    for index in range(len(settings)):
        base_s, merged_s = statistics.median(base_times[index]), statistics.median(merged_times[index])
        limit = base_flops / prefill_flops(shape, lengths[index])
        rows.append({"base_prefill_s": base_s, "merged_prefill_s": merged_s, "prefill_speedup": base_s / merged_s,
                     "prefill_speedup_limit": limit, "achieved_over_limit": base_s / merged_s / limit,
                     "merged_length": lengths[index][-1]})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Fidelity: the same settings on real texts
# ----------------------------------------------------------------------------------------------------------------


def measure_fidelity(engine: MergingEngine, texts: list[TokenText], settings: tuple[MergeSettings, ...],
                     prefixes: tuple[int, ...], continuation: int, log=print) -> list[dict]:
    samples: dict[int, list[dict]] = {i: [] for i in range(len(settings))}
    for text in texts:
        for prefix in usable_prefixes(text, prefixes):
            log(f"frontier fidelity: {text.name} at {prefix} tokens, {len(settings)} settings")
            ids = text.ids[:, :prefix].to(engine.device)
            reference = base_reference(engine, ids, continuation)
            for index, setting in enumerate(settings):
                samples[index].append(compare(engine, ids, setting, reference))
    if not samples[0]:
        raise ValueError(f"no text is long enough for any prefix length in {prefixes}")
    return [{
        "samples": len(rows),
        "top1": statistics.fmean(r["top1"] for r in rows),
        "top5": statistics.fmean(r["top5"] for r in rows),
        "kl_mean": statistics.fmean(r["kl"] for r in rows),
        "tokens_to_divergence_mean": statistics.fmean(r["tokens_to_divergence"] for r in rows),
    } for rows in samples.values()]


# ----------------------------------------------------------------------------------------------------------------
# The front
# ----------------------------------------------------------------------------------------------------------------


def pareto_front(rows: list[dict], x: str = "prefill_speedup", y: str = "top1") -> list[bool]:
    """True for each row no other row beats on both x and y (at least as good on both, better on one)."""
    return [not any(o[x] >= r[x] and o[y] >= r[y] and (o[x] > r[x] or o[y] > r[y]) for o in rows) for r in rows]


def run_frontier(engine: MergingEngine, texts: list[TokenText], plan: FrontierPlan, speed_ids: torch.Tensor,
                 log=print) -> list[dict]:
    for setting in plan.settings:
        engine.validate(max(plan.prefixes + (plan.speed_length,)), setting)
    speed = measure_speed(engine, speed_ids[:, : plan.speed_length].to(engine.device), plan.settings, plan.repeats,
                          log)
    fidelity = measure_fidelity(engine, texts, plan.settings, plan.prefixes, plan.continuation, log)
    rows = [{
        "cutoffs": "+".join(map(str, s.cutoffs)), "ratio": s.ratio, "choice": s.choice,
        "proportional": s.proportional, "method": s.method, "positions": s.positions,
        "article": is_article_setting(s), **timing, **quality,
    } for s, timing, quality in zip(plan.settings, speed, fidelity)]
    for row, on_front in zip(rows, pareto_front(rows)):
        row["on_front"] = on_front
    return rows


def best_at(rows: list[dict], speedup: float) -> dict | None:
    """The most faithful setting (top-1, then KL) among those measured at least `speedup` times faster."""
    fast = [r for r in rows if r["prefill_speedup"] >= speedup]
    return max(fast, key=lambda r: (r["top1"], -r["kl_mean"])) if fast else None


def setting_label(row: dict) -> str:
    proportional = " + prop. attn" if row["proportional"] else ""
    return f"cutoff {row['cutoffs']}, ratio {row['ratio']:g}, {row['choice']}{proportional}"


def frontier_figure(rows: list[dict]) -> go.Figure:
    """Top-1 agreement against measured prefill speed-up: every setting, the front, and the article's setting."""
    fig = go.Figure()
    styles = {("consecutive", False): ("#4C78A8", "circle"), ("uniform", False): ("#72B7B2", "square"),
              ("similar", False): ("#F58518", "diamond"), ("similar", True): ("#E45756", "star")}
    for (choice, proportional), (color, symbol) in styles.items():
        group = [r for r in rows if r["choice"] == choice and r["proportional"] == proportional and not r["article"]]
        if group:
            fig.add_scatter(
                x=[r["prefill_speedup"] for r in group], y=[r["top1"] for r in group], mode="markers",
                name=choice + (" + proportional attention" if proportional else ""),
                marker=dict(color=color, symbol=symbol, size=9, opacity=0.8),
                text=[_hover(r) for r in group], hoverinfo="text",
            )
    article = [r for r in rows if r["article"]]
    if article:
        fig.add_scatter(x=[r["prefill_speedup"] for r in article], y=[r["top1"] for r in article],
                        mode="markers+text", name="the article's setting (all pairs, one cutoff)",
                        marker=dict(color="black", symbol="x", size=11), text=[r["cutoffs"] for r in article],
                        textposition="top center", hovertext=[_hover(r) for r in article], hoverinfo="text")
    front = sorted((r for r in rows if r["on_front"]), key=lambda r: r["prefill_speedup"])
    fig.add_scatter(x=[r["prefill_speedup"] for r in front], y=[r["top1"] for r in front], mode="lines",
                    name="Pareto front", line=dict(color="rgba(0,0,0,0.45)", dash="dot", shape="hv"),
                    hoverinfo="skip")
    fig.add_vline(x=1.0, line=dict(color="grey", width=1))
    fig.update_layout(
        title="Speed × fidelity: measured prefill speed-up against next-token top-1 agreement with base",
        xaxis_title="prefill speed-up, measured (base time ÷ merged time)",
        yaxis_title="top-1 agreement with the base model", yaxis_range=[0, 1.02], template="plotly_white",
        legend=dict(orientation="h", y=-0.2),
    )
    return fig


def _hover(row: dict) -> str:
    return (f"{setting_label(row)}<br>speed-up {row['prefill_speedup']:.2f}× (limit {row['prefill_speedup_limit']:.2f}×)"
            f"<br>top-1 {row['top1']:.3f}, KL {row['kl_mean']:.3f}, "
            f"{row['tokens_to_divergence_mean']:.1f} tokens to diverge")


# ----------------------------------------------------------------------------------------------------------------
# The command: python -m slerpviz.bench frontier [...]
# ----------------------------------------------------------------------------------------------------------------

FRONTIER_TABLE = [
    ("cutoffs", "cutoff", ""), ("ratio", "ratio", ".2f"), ("choice", "choice", ""),
    ("proportional", "prop.", ""), ("prefill_speedup", "speed-up", ".2f"), ("prefill_speedup_limit", "limit", ".2f"),
    ("top1", "top-1", ".3f"), ("top5", "top-5", ".3f"), ("kl_mean", "KL", ".3f"),
    ("tokens_to_divergence_mean", "tokens to diverge", ".1f"),
]


def frontier_parser():
    import argparse
    from pathlib import Path

    from .engines import SHAPES

    p = argparse.ArgumentParser(prog="python -m slerpviz.bench frontier", description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="an allow-listed model name (default: the embedded SmolLM2-135M-Instruct)")
    which.add_argument("--shape", choices=SHAPES, help="random weights (tiny: for tests; fidelity means nothing)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="for --shape")
    p.add_argument("--seed", type=int, default=0, help="for --shape: the random weights and texts")
    p.add_argument("--quick", action="store_true", help="a small grid that runs in a few minutes on a CPU")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for frontier.csv, .json, .html")
    p.add_argument("--texts", type=Path, action="append", help="text files or folders (default: assets/texts)")
    p.add_argument("--prefixes", help="fidelity prompt lengths in tokens, comma-separated (default 128,512)")
    p.add_argument("--speed-length", type=int, help="prompt length the prefill is timed at (default 1024)")
    p.add_argument("--repeats", type=int, help="interleaved timing repeats (default 3)")
    p.add_argument("--continuation", type=int, help="greedy tokens compared after each prefix (default 8)")
    p.add_argument("--method", default="slerp", help="interpolation used for every setting")
    p.add_argument("--positions", default="mean", help="positions mode used for every setting")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    return p


def frontier_main(argv: list[str] | None = None) -> int:
    import sys

    from . import report
    from .command import build_engine, describe_model, int_list
    from .machine import machine_info
    from .texts import random_texts, read_texts, tokenize

    args = frontier_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    try:
        engine, name = build_engine(args)
        plan = FrontierPlan(
            settings=default_grid(engine.num_layers, args.quick, args.method, args.positions),
            prefixes=int_list(args.prefixes) if args.prefixes else ((128,) if args.quick else (128, 512)),
            speed_length=args.speed_length or (512 if args.quick else 1024),
            repeats=args.repeats or (2 if args.quick else 3),
            continuation=args.continuation or (4 if args.quick else 8),
        )
        if args.shape:  # random weights: only the code path is exercised, the figures mean nothing
            texts = random_texts(engine.config.vocab_size, 2, max(*plan.prefixes, plan.speed_length), args.seed)
        else:
            texts = tokenize(engine.tokenizer, read_texts(args.texts))[: 2 if args.quick else None]
        longest = max(texts, key=lambda t: t.ids.shape[-1])
        if longest.ids.shape[-1] < plan.speed_length:
            raise ValueError(f"the longest text has {longest.ids.shape[-1]} tokens; --speed-length "
                             f"{plan.speed_length} needs at least that many")
        began = time.perf_counter()
        rows = run_frontier(engine, texts, plan, longest.ids, log)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    machine, model = machine_info(engine.device, ["frontier", *(argv or [])]), describe_model(engine, name)
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_csv(args.out / "frontier.csv", rows, FRONTIER_COLUMNS)
    targets = {f"best_at_{s:g}x": best_at(rows, s) for s in (1.3, 1.5)}
    report.write_json(args.out / "frontier.json", {
        "benchmark": "frontier", "machine": machine, "model": model, "rows": rows, **targets,
        "plan": {"prefixes": plan.prefixes, "speed_length": plan.speed_length, "repeats": plan.repeats,
                 "continuation": plan.continuation, "texts": [t.name for t in texts]},
    })
    notes = ["Speed-up: base prefill time ÷ merged prefill time at the same prompt length, measured interleaved in "
             "this run (medians); the limit is the FLOP ratio from the config for the lengths each layer saw. "
             "Top-1: the merged model's next token equals the base model's, over the texts and prefix lengths."]
    report.write_html(args.out / "frontier.html", f"slerpviz frontier: {name}", machine, [frontier_figure(rows)],
                      notes)
    print(f"frontier on {machine['gpu'] or machine['cpu']} ({machine['device']}), model {name}, "
          f"{len(rows)} settings, {time.perf_counter() - began:.0f} s")
    front = sorted((r for r in rows if r["on_front"]), key=lambda r: r["prefill_speedup"])
    print("Pareto front (speed-up against top-1):")
    print(report.format_table(front, FRONTIER_TABLE))
    print("the article's setting (all pairs, one cutoff, consecutive):")
    print(report.format_table([r for r in rows if r["article"]], FRONTIER_TABLE))
    for key, row in targets.items():
        print(f"{key.replace('_', ' ')}: " + (f"{setting_label(row)}: top-1 {row['top1']:.3f}, "
                                              f"{row['prefill_speedup']:.2f}x" if row else "none measured"))
    print(f"\nwrote {args.out / 'frontier.csv'}, frontier.json, frontier.html")
    return 0
