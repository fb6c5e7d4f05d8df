"""The speed × fidelity frontier: which tokens to merge, not just where.

For every setting of a grid (cutoff × merge ratio × pair choice × proportional attention) this measures, in one
run, the prefill speed-up over the base model (interleaved base / merged timings, medians) and the fidelity of the
merged next token on the default texts (top-1, KL, tokens until greedy continuations differ). The Pareto front of
speed-up against top-1 agreement tells which settings are worth using; the article's setting (all pairs, one cutoff,
consecutive) is drawn beside it for comparison. The grids themselves are slerpviz.bench.grids.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import plotly.graph_objects as go
import torch

from ..engine import MergeSettings, MergingEngine
from . import options
from .fidelity import base_reference, compare, decided_top1, usable_prefixes
from .grids import ATTENTION_PASSES, beside_drop, named_grid
from .limits import Shape, prefill_flops
from .texts import TokenText

# The MergeSettings fields a row holds as they are (the cutoffs are written "15+20").
SETTING_COLUMNS = (
    "ratio", "choice", "proportional", "method", "positions", "keep_start", "keep_end",
    "attention_window", "attention_keep", "attention_keep_share", "attention_reach", "cosine_share", "keep_recent",
)
FRONTIER_COLUMNS = (
    "cutoffs", *SETTING_COLUMNS, "article",
    "prefill_speedup", "prefill_speedup_limit", "achieved_over_limit", "merged_length", "base_prefill_s",
    "merged_prefill_s", "samples", "top1", "decided_samples", "top1_decided", "top5", "kl_mean",
    "tokens_to_divergence_mean",
    "passkey_correct", "passkey_n", "passkey_accuracy", "on_front",
)

# One row per setting and sample: two settings' rows on the same text and prefix are a pair (a sign test of their KL
# needs no rerun).
WINDOW_COLUMNS = ("setting", "text", "prefix", "top1", "kl", "base_margin", "top5", "tokens_to_divergence")


@dataclass(frozen=True)
class FrontierPlan:
    settings: tuple[MergeSettings, ...]
    prefixes: tuple[int, ...]  # fidelity is measured at these prompt lengths
    speed_length: int  # prefill is timed at this prompt length (and the FLOP limit taken there)
    repeats: int  # 0: no timing, the FLOP limit alone
    continuation: int
    retrieval_lengths: tuple[int, ...] = (1024,)  # pass-key prompts of these lengths
    retrieval_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    retrieval_samples: int = 2  # per length and depth


def is_article_setting(settings: MergeSettings) -> bool:
    return (len(settings.cutoffs) == 1 and settings.ratio == 1.0 and settings.choice == "consecutive"
            and not settings.proportional)


# ----------------------------------------------------------------------------------------------------------------
# Speed: prefill, base and merged interleaved
# ----------------------------------------------------------------------------------------------------------------


def timed_prefill(engine: MergingEngine, ids: torch.Tensor, settings: MergeSettings) -> tuple[float, list[int]]:
    """Seconds for one cached prefill (merge included), and the sequence length each layer saw."""
    engine.sync()
    began = time.perf_counter()
    session = engine.prefill(ids, settings)
    engine.sync()
    seconds = time.perf_counter() - began
    return seconds, session.kv_lengths()


def measure_speed(engine: MergingEngine, ids: torch.Tensor, settings: tuple[MergeSettings, ...], repeats: int,
                  log=print) -> list[dict]:
    """Base and each merged setting timed in turn (base, merged, base, merged ...), repeated; medians."""
    shape = Shape.from_config(engine.config, engine.dtype)
    _, base_lengths = timed_prefill(engine, ids, MergeSettings())  # warm-up, not counted
    base_times: dict[int, list[float]] = {i: [] for i in range(len(settings))}
    merged_times: dict[int, list[float]] = {i: [] for i in range(len(settings))}
    lengths: dict[int, list[int]] = {}
    if repeats == 0:  # no timing: one prefill each for the lengths every layer sees, and so the FLOP limit
        lengths = {index: timed_prefill(engine, ids, setting)[1] for index, setting in enumerate(settings)}
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
        limit = base_flops / prefill_flops(shape, lengths[index])
        row = {"prefill_speedup_limit": limit, "merged_length": lengths[index][-1], "base_prefill_s": None,
               "merged_prefill_s": None, "prefill_speedup": None, "achieved_over_limit": None}
        if repeats:
            base_s, merged_s = statistics.median(base_times[index]), statistics.median(merged_times[index])
            row.update(base_prefill_s=base_s, merged_prefill_s=merged_s, prefill_speedup=base_s / merged_s,
                       achieved_over_limit=base_s / merged_s / limit)
        rows.append(row)
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
                samples[index].append({"text": text.name, "prefix": prefix,
                                       **compare(engine, ids, setting, reference)})
    if not samples[0]:
        raise ValueError(f"no text is long enough for any prefix length in {prefixes}")
    return [{
        "windows": rows,  # each sample, for frontier_windows.csv: settings compared window by window
        "samples": len(rows),
        "top1": statistics.fmean(r["top1"] for r in rows),
        **decided_top1(rows),
        "top5": statistics.fmean(r["top5"] for r in rows),
        "kl_mean": statistics.fmean(r["kl"] for r in rows),
        "tokens_to_divergence_mean": statistics.fmean(r["tokens_to_divergence"] for r in rows),
    } for rows in samples.values()]


# ----------------------------------------------------------------------------------------------------------------
# The front
# ----------------------------------------------------------------------------------------------------------------


def measure_retrieval(engine: MergingEngine, haystack, settings: tuple[MergeSettings, ...], plan: FrontierPlan,
                      log=print) -> tuple[list[dict], list[dict]]:
    """Pass-key accuracy of the base and of each setting on the very same prompts: (one row per setting with
    passkey_correct / passkey_n / passkey_accuracy, and every trial)."""
    from .retrieval import RetrievalPlan, passkey_accuracy, run_retrieval

    labels = [f"setting {index}" for index in range(len(settings))]
    retrieval = RetrievalPlan(tasks=("passkey",), lengths=plan.retrieval_lengths, depths=plan.retrieval_depths,
                              samples=plan.retrieval_samples, variants=tuple(zip(labels, settings)))
    trials = run_retrieval(engine, haystack, retrieval, log)
    rows = []
    for label in ["base", *labels]:
        correct, n = passkey_accuracy(trials, label)
        rows.append({"passkey_correct": correct, "passkey_n": n, "passkey_accuracy": correct / n if n else None})
    return rows, trials


def speed_key(rows: list[dict]) -> str:
    """Measured speed-up where it was timed, else the FLOP limit."""
    return "prefill_speedup" if all(r.get("prefill_speedup") is not None for r in rows) else "prefill_speedup_limit"


def pareto_front(rows: list[dict], keys: tuple[str, ...] = ("prefill_speedup", "top1")) -> list[bool]:
    """True for each row no other row beats on every key (at least as good on all, better on one). A key a row has
    no figure for (None) does not count."""
    def value(row, key):
        return row.get(key) if row.get(key) is not None else float("-inf")

    def beats(o, r):
        return (all(value(o, k) >= value(r, k) for k in keys) and any(value(o, k) > value(r, k) for k in keys))

    return [not any(beats(o, r) for o in rows) for r in rows]


def run_frontier(engine: MergingEngine, texts: list[TokenText], plan: FrontierPlan, speed_ids: torch.Tensor,
                 log=print, haystack=None) -> tuple[list[dict], dict | None]:
    """One row per setting: speed, fidelity and (with a haystack) pass-key retrieval; and the base's retrieval."""
    for setting in plan.settings:
        engine.validate(max(plan.prefixes + (plan.speed_length,)), setting)
    speed = measure_speed(engine, speed_ids[:, : plan.speed_length].to(engine.device), plan.settings, plan.repeats,
                          log)
    fidelity = measure_fidelity(engine, texts, plan.settings, plan.prefixes, plan.continuation, log)
    retrieval, base = [{} for _ in plan.settings], None
    if haystack is not None and plan.retrieval_lengths:
        found, _ = measure_retrieval(engine, haystack, plan.settings, plan, log)
        base, retrieval = found[0], found[1:]
    rows = [{
        "cutoffs": "+".join(map(str, s.cutoffs)), **{column: getattr(s, column) for column in SETTING_COLUMNS},
        "article": is_article_setting(s), **timing, **quality, **found,
    } for s, timing, quality, found in zip(plan.settings, speed, fidelity, retrieval)]
    keys = (speed_key(rows), "top1", *(("passkey_accuracy",) if base else ()))
    for row, on_front in zip(rows, pareto_front(rows, keys)):
        row["on_front"] = on_front
    return rows, base


# The speed-ups the frontier names its best setting at: the presets' 1.35x and 1.5x, and issue 24's 2x.
TARGETS = (1.3, 1.5, 2.0)


def best_at(rows: list[dict], speedup: float, key: str = "prefill_speedup") -> dict | None:
    """The most faithful setting (top-1, then pass-key accuracy, then KL) among those at least `speedup` times
    faster by `key` (measured, or the FLOP limit)."""
    fast = [r for r in rows if r.get(key) is not None and r[key] >= speedup]
    return max(fast, key=lambda r: (r["top1"], r.get("passkey_accuracy") or 0, -r["kl_mean"])) if fast else None


def retrieval_text(row: dict, base: dict | None) -> str:
    if row.get("passkey_n"):
        against = f" (base {base['passkey_correct']}/{base['passkey_n']})" if base else ""
        return f"pass key {row['passkey_correct']}/{row['passkey_n']}{against}"
    return "pass key not measured"


def frontier_figure(rows: list[dict], base: dict | None = None) -> go.Figure:
    """Top-1 agreement (and pass-key accuracy, when measured) against prefill speed-up: every setting, the front,
    and the article's setting."""
    from plotly.subplots import make_subplots

    x_key = speed_key(rows)
    panels = [("top1", "next-token top-1 agreement with base")]
    if any(r.get("passkey_accuracy") is not None for r in rows):
        panels.append(("passkey_accuracy", "pass-key accuracy" + (
            f" (base {base['passkey_correct']}/{base['passkey_n']})" if base else "")))
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[title for _, title in panels],
                        horizontal_spacing=0.08)
    styles = {("consecutive", False): ("#4C78A8", "circle"), ("uniform", False): ("#72B7B2", "square"),
              ("similar", False): ("#F58518", "diamond"), ("similar", True): ("#E45756", "star"),
              ("attention", False): ("#54A24B", "triangle-up"), ("attention", True): ("#B279A2", "triangle-down")}
    for col, (y_key, _) in enumerate(panels, start=1):
        for (choice, proportional), (color, symbol) in styles.items():
            group = [r for r in rows if r["choice"] == choice and r["proportional"] == proportional
                     and not r["article"]]
            if group:
                fig.add_scatter(
                    x=[r[x_key] for r in group], y=[r[y_key] for r in group], mode="markers",
                    name=choice + (" + proportional attention" if proportional else ""), legendgroup=choice + str(
                        proportional), showlegend=col == 1,
                    marker=dict(color=color, symbol=symbol, size=9, opacity=0.8),
                    text=[_hover(r, x_key, base) for r in group], hoverinfo="text", row=1, col=col,
                )
        article = [r for r in rows if r["article"]]
        if article:
            fig.add_scatter(x=[r[x_key] for r in article], y=[r[y_key] for r in article], mode="markers+text",
                            name="the article's setting (all pairs, one cutoff)", legendgroup="article",
                            showlegend=col == 1, marker=dict(color="black", symbol="x", size=11),
                            text=[r["cutoffs"] for r in article], textposition="top center",
                            hovertext=[_hover(r, x_key, base) for r in article], hoverinfo="text", row=1, col=col)
        front = sorted((r for r in rows if r["on_front"]), key=lambda r: r[x_key])
        fig.add_scatter(x=[r[x_key] for r in front], y=[r[y_key] for r in front], mode="markers",
                        name="Pareto front (speed, top-1, pass key)", legendgroup="front", showlegend=col == 1,
                        marker=dict(size=16, color="rgba(0,0,0,0)", line=dict(color="black", width=1)),
                        hoverinfo="skip", row=1, col=col)
        fig.add_vline(x=1.0, line=dict(color="grey", width=1), row=1, col=col)
        fig.update_xaxes(title_text="prefill speed-up, " + (
            "measured (base time ÷ merged time)" if x_key == "prefill_speedup" else "FLOP limit"), row=1, col=col)
        fig.update_yaxes(range=[-0.02, 1.02], row=1, col=col)
    fig.update_layout(title="Speed × fidelity × retrieval: each setting against the base model",
                      template="plotly_white", legend=dict(orientation="h", y=-0.25), height=520)
    return fig


def decided_text(row: dict) -> str:
    """Top-1 where the base had decided, for the hover (rows of an older run have none)."""
    if row.get("top1_decided") is None:
        return ""
    return f"; {row['top1_decided']:.3f} where the base had decided (n={row['decided_samples']})"


def _hover(row: dict, x_key: str, base: dict | None) -> str:
    measured = (f"speed-up {row['prefill_speedup']:.2f}× " if row.get("prefill_speedup") is not None else "")
    return (f"{options.settings_label(row)}<br>{measured}(FLOP limit {row['prefill_speedup_limit']:.2f}×)"
            f"<br>top-1 {row['top1']:.3f} (n={row['samples']}){decided_text(row)}, KL {row['kl_mean']:.3f}, "
            f"{row['tokens_to_divergence_mean']:.1f} tokens to diverge<br>{retrieval_text(row, base)}")


# ----------------------------------------------------------------------------------------------------------------
# The command: python -m slerpviz.bench frontier [...]
# ----------------------------------------------------------------------------------------------------------------

FRONTIER_TABLE = [
    ("label", "setting", ""), ("prefill_speedup", "speed-up", ".2f"), ("prefill_speedup_limit", "limit", ".2f"),
    ("samples", "n", ""), ("top1", "top-1", ".3f"), ("decided_samples", "n decided", ""),
    ("top1_decided", "top-1 decided", ".3f"), ("kl_mean", "KL", ".3f"),
    ("tokens_to_divergence_mean", "to diverge", ".1f"), ("passkey", "pass key", ""),
]


def table_rows(rows: list[dict]) -> list[dict]:
    return [{**r, "label": options.settings_label(r),
             "passkey": f"{r['passkey_correct']}/{r['passkey_n']}" if r.get("passkey_n") else None} for r in rows]


def parser(add_parser=None) -> argparse.ArgumentParser:
    """Its own options on the shared ones of .options; `add_parser`: as a subcommand of python -m slerpviz.bench."""
    p = options.subcommand("frontier", __doc__.split("\n\n")[0], [
        options.model_options("random weights (tiny: for tests; fidelity means nothing)",
                              "for --shape: the random weights and texts"),
        options.run_options("a small grid that runs in a few minutes on a CPU",
                            "folder for frontier.csv, .json, .html"),
        options.text_options(), options.interpolation_options("every setting of the grid"),
    ], add_parser, summary="the speed x fidelity frontier: which settings are worth using")
    p.add_argument("--grid", type=options.given, default="default",
                   help=f"default (cutoff x ratio x pair choice), attention, {', '.join(ATTENTION_PASSES)} (the "
                        "attention-guided exploration) or presets (judge them)")
    p.add_argument("--prefixes", type=options.listed,
                   help="fidelity prompt lengths in tokens, comma-separated (default 128,512)")
    p.add_argument("--offsets", type=options.listed,
                   help="fidelity samples also start this many tokens into each text, comma-separated (default 0): "
                        "more samples from the same texts")
    p.add_argument("--speed-length", type=options.whole(1), help="prompt length the prefill is timed at (default 1024)")
    p.add_argument("--repeats", type=options.whole(0),
                   help="interleaved timing repeats (default 3; 0 = FLOP limit only)")
    p.add_argument("--continuation", type=options.whole(1), help="greedy tokens compared after each prefix (default 8)")
    p.add_argument("--retrieval-lengths", type=options.listed,
                   help="pass-key prompt lengths, comma-separated (default 1024; --quick 512; 'none' to skip)")
    p.add_argument("--retrieval-samples", type=options.whole(1),
                   help="pass-key prompts per length and depth, five depths (default 2: 10 per length)")
    p.add_argument("--drop-beside", action="store_true",
                   help="each setting again with its pairs dropped instead of merged (method drop, positions first): "
                        "merging against dropping at equal length")
    return p


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """`python -m slerpviz.bench frontier` with `argv` (the words after `frontier`); `args`: already parsed."""
    import sys

    from . import report
    from .machine import machine_info
    from .options import build_engine, check_out, describe_model, int_list
    from .retrieval import Haystack
    from .texts import random_texts, read_texts, tokenize, windows

    args = args if args is not None else parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    try:
        check_out(args.out)
        engine, name = build_engine(args)
        retrieval_lengths = (() if args.retrieval_lengths == "none" else int_list(args.retrieval_lengths)
                             if args.retrieval_lengths is not None else ((512,) if args.quick else (1024,)))
        plan = FrontierPlan(
            settings=beside_drop(named_grid(args.grid, engine.num_layers, args.quick, args.method, args.positions),
                                 args.drop_beside),
            prefixes=(int_list(args.prefixes, "prefix") if args.prefixes is not None
                      else (128,) if args.quick else (128, 512)),
            speed_length=args.speed_length or (512 if args.quick else 1024),
            repeats=args.repeats if args.repeats is not None else (2 if args.quick else 3),
            continuation=args.continuation or (4 if args.quick else 8),
            retrieval_lengths=retrieval_lengths,
            retrieval_depths=(0.0, 0.5, 1.0) if args.quick else (0.0, 0.25, 0.5, 0.75, 1.0),
            retrieval_samples=args.retrieval_samples or (1 if args.quick else 2),
        )
        named_texts = read_texts(args.texts)
        if args.shape:  # random weights: only the code path is exercised, the figures mean nothing
            texts = random_texts(engine.config.vocab_size, 2, max(*plan.prefixes, plan.speed_length), args.seed)
        else:
            texts = tokenize(engine.tokenizer, named_texts)[: 2 if args.quick else None]
        longest = max(texts, key=lambda t: t.ids.shape[-1])
        if longest.ids.shape[-1] < plan.speed_length:
            raise ValueError(f"the longest text has {longest.ids.shape[-1]} tokens; --speed-length "
                             f"{plan.speed_length} needs at least that many")
        samples = windows(texts, int_list(args.offsets, "offset", 0) if args.offsets is not None else (0,))
        haystack = Haystack(engine.tokenizer, [text for _, text in named_texts]) if plan.retrieval_lengths else None
        began = time.perf_counter()
        rows, base = run_frontier(engine, samples, plan, longest.ids, log, haystack)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    machine, model = machine_info(engine.device, ["frontier", *(argv or [])]), describe_model(engine, name)
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_csv(args.out / "frontier_windows.csv", [
        {"setting": options.settings_label(row), **window} for row in rows for window in row.pop("windows")],
        WINDOW_COLUMNS)
    report.write_csv(args.out / "frontier.csv", rows, FRONTIER_COLUMNS)
    x_key = speed_key(rows)
    targets = {f"best_at_{s:g}x": best_at(rows, s, x_key) for s in TARGETS}
    by_limit = {f"best_at_{s:g}x_by_limit": best_at(rows, s, "prefill_speedup_limit") for s in TARGETS}
    report.write_json(args.out / "frontier.json", {
        "benchmark": "frontier", "machine": machine, "model": model, "rows": rows, **targets, **by_limit,
        "base_passkey": base,
        "plan": {"grid": args.grid, "quick": args.quick, "method": args.method, "positions": args.positions,
                 "drop_beside": args.drop_beside, "prefixes": plan.prefixes, "offsets": args.offsets or "0",
                 "speed_length": plan.speed_length, "repeats": plan.repeats, "continuation": plan.continuation,
                 "retrieval_lengths": plan.retrieval_lengths, "retrieval_depths": plan.retrieval_depths,
                 "retrieval_samples": plan.retrieval_samples, "texts": [t.name for t in texts]},
    })
    notes = ["Speed-up: base prefill time ÷ merged prefill time at the same prompt length, measured interleaved in "
             "this run (medians); the limit is the FLOP ratio from the config for the lengths each layer saw. "
             "Top-1: the merged model's next token equals the base model's, over the texts and prefix lengths (n "
             "samples). Pass key: a 5-digit key hidden at five depths of filler, found in the greedy continuation "
             f"(correct/n), at {', '.join(map(str, plan.retrieval_lengths)) or 'no'} tokens."]
    report.write_html(args.out / "frontier.html", f"slerpviz frontier: {name}", machine,
                      [frontier_figure(rows, base)], notes)
    print(f"frontier on {machine['gpu'] or machine['cpu']} ({machine['device']}), model {name}, grid {args.grid}, "
          f"{len(rows)} settings, {time.perf_counter() - began:.0f} s")
    if base:
        print(f"base: {retrieval_text(base, None)}")
    front = sorted((r for r in rows if r["on_front"]), key=lambda r: r[x_key])
    print("Pareto front (speed-up, top-1" + (", pass key):" if base else "):"))
    print(report.format_table(table_rows(front), FRONTIER_TABLE))
    article = [r for r in rows if r["article"]]
    if article:
        print("the article's setting (all pairs, one cutoff, consecutive):")
        print(report.format_table(table_rows(article), FRONTIER_TABLE))
    for key, row in {**targets, **by_limit}.items():
        what = key.replace("_by_limit", " (by FLOP limit)").replace("_", " ")
        print(f"{what}: " + (f"{options.settings_label(row)}: top-1 {row['top1']:.3f} (n={row['samples']}), "
                             f"{retrieval_text(row, base)}, {row[x_key]:.2f}x" if row else "none measured"))
    print(f"\nwrote {args.out / 'frontier.csv'}, frontier_windows.csv, frontier.json, frontier.html")
    return 0
