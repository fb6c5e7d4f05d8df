"""Fidelity: how far the merged model's next token strays from the base model's, over real texts.

For each text and prefix length the base model is run once (its next-token distribution and its greedy
continuation); every merged setting is then compared against that one reference:
  top1            merged top-1 token == base top-1 token
  top5            base top-1 token is among merged's top 5
  top5_overlap    |merged top-5 ∩ base top-5| / 5
  kl              KL(base ‖ merged) of the next-token distributions, in nats
  base_margin     how far the base's own top-1 probability leads its second: where it is a near-tie (below
                  DECIDED_MARGIN) any small change to the prompt can flip the top-1, so `top1_decided` counts
                  agreement only where the base had decided (a sample's summary gives both, with their n)
  tokens_to_divergence
                  greedy continuations (cached decoding, as the app runs) agree for this many tokens before the first
                  difference; `continuation` when they never differ within it (censored).
The last one is teacher-forced: the merged model is fed the base model's continuation, and the first step where its
greedy choice differs is where a free merged continuation would first differ, so each setting stops at its first
difference instead of generating the whole continuation.
Below the run, `python -m slerpviz.bench fidelity`: its parser, its plan from the options, its files and its main.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import settings as checks
from ..engine import MergeSettings, MergingEngine, Sampling
from ..merge import CHOICES, INTERPOLATIONS, METHODS, POSITION_MODES
from . import report, schedules
from .machine import machine_info
from .options import (DESCRIPTION, PROPORTIONAL, build_engine, describe_model, guarded, int_list, listed, share,
                      speed_fidelity_parents, str_list, subcommand, text_options, whole)
from .report import variant_label
from .schedules import Schedule, label
from .texts import TokenText, random_texts, read_texts, tokenize

# The base's top-1 probability must lead its second by this much for its top-1 to count as decided. On the list
# texts 56 of 256 windows fall below it, and 28 of recommended's 39 top-1 misses there (docs/measurements.md,
# seventeenth pass): at a near-tie a disagreement says little about the merge.
DECIDED_MARGIN = 0.05

# How a merge is done, apart from where: the settings a "best" is chosen among.
VARIANT_KEYS = ("method", "positions", "choice", "proportional")

FIDELITY_COLUMNS = (
    "text", "prefix", "schedule", "stages", "first_cutoff", *VARIANT_KEYS, "ratio",
    "top1", "top5", "top5_overlap", "kl", "base_margin", "tokens_to_divergence", "censored",
)

SUMMARY_COLUMNS = (
    "schedule", "stages", "first_cutoff", *VARIANT_KEYS, "samples",
    "top1", "decided_samples", "top1_decided", "top5", "top5_overlap", "kl_mean", "kl_median",
    "tokens_to_divergence_mean", "censored_share",
)


@dataclass(frozen=True)
class FidelityPlan:
    """The grid: every schedule × method × positions (× pair choice × proportional attention, one each by
    default), at every prefix length of every text."""

    prefixes: tuple[int, ...]
    schedules: tuple[Schedule, ...]
    methods: tuple[str, ...] = INTERPOLATIONS  # drop, the control, when asked for (--methods ...,drop)
    positions: tuple[str, ...] = POSITION_MODES
    choices: tuple[str, ...] = ("consecutive",)
    proportional: tuple[bool, ...] = (False,)
    ratio: float | tuple[float, ...] = 1.0  # one for every cutoff, or one per cutoff of each schedule
    continuation: int = 16
    keep_start: int = 0
    keep_end: int = 0
    keep_recent: int = 0

    def settings(self) -> list[MergeSettings]:
        """Every setting of the grid, each through the library's parser of merge settings (a bad one is one line)."""
        return [
            checks.merge_settings(cutoffs=s, keep_start=self.keep_start, keep_end=self.keep_end,
                                  keep_recent=self.keep_recent, method=m, positions=p, choice=c, proportional=a,
                                  ratio=self.ratio)
            for s in self.schedules for m in self.methods for p in self.positions for c in self.choices
            for a in self.proportional
        ]


@dataclass(frozen=True)
class Reference:
    """The base model at one prefix: its next-token log-probabilities and its greedy continuation."""

    log_probs: torch.Tensor  # [vocab] float32
    continuation: list[int]


# ----------------------------------------------------------------------------------------------------------------
# Base and merged at one prefix
# ----------------------------------------------------------------------------------------------------------------


def base_reference(engine: MergingEngine, ids: torch.Tensor, continuation: int) -> Reference:
    """The base model's next-token distribution at `ids` and its greedy continuation of `continuation` tokens."""
    session = engine.prefill(ids, MergeSettings())
    logits = session.logits[0]
    tokens = [int(logits.argmax())]
    for _ in range(1, continuation):
        tokens.append(int(session.decode(tokens[-1]).argmax()))
    return Reference(torch.log_softmax(logits, -1), tokens)


def compare(engine: MergingEngine, ids: torch.Tensor, settings: MergeSettings, reference: Reference) -> dict:
    """The merged model at `ids` against the base reference."""
    session = engine.prefill(ids, settings)
    log_probs = torch.log_softmax(session.logits[0], -1)
    base_top5 = reference.log_probs.topk(5).indices
    merged_top5 = log_probs.topk(5).indices
    base_top1 = int(base_top5[0])
    kl = (reference.log_probs.exp() * (reference.log_probs - log_probs)).sum()
    first, second = reference.log_probs[base_top5[:2]].exp().tolist()
    return {
        "top1": float(int(merged_top5[0]) == base_top1),
        "base_margin": first - second,
        "top5": float(base_top1 in merged_top5.tolist()),
        "top5_overlap": len(set(base_top5.tolist()) & set(merged_top5.tolist())) / 5,
        "kl": max(float(kl), 0.0),  # KL is never negative; a tiny negative value is rounding
        **divergence(session, reference.continuation),
    }


def divergence(session, continuation: list[int]) -> dict:
    """How many tokens of the base's greedy continuation the merged model (a prefilled session) would also choose,
    in a row."""
    agreed, logits = 0, session.logits
    while agreed < len(continuation) and int(logits.argmax()) == continuation[agreed]:
        agreed += 1
        if agreed < len(continuation):
            logits = session.decode(continuation[agreed - 1])
    return {"tokens_to_divergence": agreed, "censored": agreed == len(continuation)}


# ----------------------------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------------------------


def usable_prefixes(text: TokenText, prefixes: tuple[int, ...]) -> list[int]:
    """The prefix lengths this text is long enough for (3 tokens at least: first, one merged pair, last)."""
    return [p for p in prefixes if 3 <= p <= text.ids.shape[-1]]


def run_fidelity(engine: MergingEngine, texts: list[TokenText], plan: FidelityPlan, log=print) -> list[dict]:
    settings_grid = plan.settings()
    for settings in settings_grid:  # the context must hold the longest prefix and its continuation
        engine.validate(max(plan.prefixes), settings, Sampling(max_new_tokens=plan.continuation))
    if not any(usable_prefixes(text, plan.prefixes) for text in texts):
        raise ValueError(f"no text is long enough for any prefix length in {plan.prefixes}")
    rows = []
    for text in texts:
        prefixes = usable_prefixes(text, plan.prefixes)
        log(f"fidelity: {text.name}: prefixes {prefixes}, {len(settings_grid)} settings")
        for prefix in prefixes:
            ids = text.ids[:, :prefix].to(engine.device)
            reference = base_reference(engine, ids, plan.continuation)
            for settings in settings_grid:
                rows.append({
                    "text": text.name,
                    "prefix": prefix,
                    "schedule": label(settings.cutoffs),
                    "stages": len(settings.cutoffs),
                    "first_cutoff": min(settings.cutoffs),
                    **{key: getattr(settings, key) for key in VARIANT_KEYS},
                    "ratio": settings.ratio,
                    **compare(engine, ids, settings, reference),
                })
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------------------------


def summarise(rows: list[dict], by: tuple[str, ...] = ("schedule", *VARIANT_KEYS)) -> list[dict]:
    """Means over the samples of each group, in the order groups first appear."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in by), []).append(row)
    summary = []
    for key, members in groups.items():
        first = members[0]
        summary.append({
            **dict(zip(by, key)),
            "stages": first["stages"],
            "first_cutoff": first["first_cutoff"],
            "samples": len(members),
            "top1": statistics.fmean(r["top1"] for r in members),
            **decided_top1(members),
            "top5": statistics.fmean(r["top5"] for r in members),
            "top5_overlap": statistics.fmean(r["top5_overlap"] for r in members),
            "kl_mean": statistics.fmean(r["kl"] for r in members),
            "kl_median": statistics.median(r["kl"] for r in members),
            "tokens_to_divergence_mean": statistics.fmean(r["tokens_to_divergence"] for r in members),
            "censored_share": statistics.fmean(float(r["censored"]) for r in members),
        })
    return summary


def decided_top1(rows: list[dict]) -> dict:
    """Top-1 agreement over the samples where the base had decided (its margin at least DECIDED_MARGIN), and how
    many those were (None where none was)."""
    decided = [r["top1"] for r in rows if r["base_margin"] >= DECIDED_MARGIN]
    return {"decided_samples": len(decided), "top1_decided": statistics.fmean(decided) if decided else None}


def merges_anything(schedule_label: str, num_layers: int) -> bool:
    """A schedule whose first cutoff is the last layer changes nothing: it must not count towards 'best'."""
    return int(schedule_label.split("+")[0]) < num_layers


def _mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def best_combination(summary: list[dict], num_layers: int) -> dict | None:
    """The variant (method, positions, ...) that ranks best by KL at the schedules that merge anything.

    Each schedule ranks the variants by mean KL(base ‖ merged), and the ranks are averaged, so every cutoff counts
    the same: a mean KL itself would be decided by the earliest cutoffs, where every variant is far off. KL is used
    rather than top-1 because it compares whole distributions on the same samples, while top-1 agreement moves in
    steps of one sample; ties go to the lower mean KL. The ranking lists every variant with both figures.
    """
    merging = [r for r in summary if merges_anything(r["schedule"], num_layers)]
    if not merging:
        return None
    ranks: dict[tuple, list[float]] = {}
    for schedule in dict.fromkeys(r["schedule"] for r in merging):
        rows = sorted((r for r in merging if r["schedule"] == schedule), key=lambda r: r["kl_mean"])
        for rank, row in enumerate(rows, start=1):
            ranks.setdefault(tuple(row[k] for k in VARIANT_KEYS), []).append(rank)
    ranking = []
    for key, variant_ranks in ranks.items():
        rows = [r for r in merging if tuple(r[k] for k in VARIANT_KEYS) == key]
        variant = dict(zip(VARIANT_KEYS, key))
        ranking.append({**variant, "label": variant_label(variant), "kl_rank": statistics.fmean(variant_ranks),
                        "top1": _mean(rows, "top1"), "kl_mean": _mean(rows, "kl_mean"),
                        "tokens_to_divergence_mean": _mean(rows, "tokens_to_divergence_mean")})
    ranking.sort(key=lambda r: (r["kl_rank"], r["kl_mean"]))
    return {**ranking[0], "ranking": ranking}


def same_variant(row: dict, variant: dict) -> bool:
    return all(row[k] == variant[k] for k in VARIANT_KEYS)


def earliest_cutoff(summary: list[dict], variant: dict, num_layers: int, threshold: float) -> int | None:
    """The earliest single-stage cutoff whose top-1 agreement reaches `threshold` for this variant, and stays
    there for every later cutoff measured: merging earlier saves more, so this is the fastest faithful one."""
    singles = sorted((r for r in summary if r["stages"] == 1 and same_variant(r, variant)),
                     key=lambda r: r["first_cutoff"])
    earliest = None
    for row in reversed(singles):
        if row["top1"] < threshold:
            break
        if merges_anything(row["schedule"], num_layers):
            earliest = row["first_cutoff"]
    return earliest


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------


def parser(add_parser=None) -> argparse.ArgumentParser:
    """Its own options on the shared ones of .options; `add_parser`: as a subcommand of python -m slerpviz.bench."""
    p = subcommand("fidelity", DESCRIPTION, [*speed_fidelity_parents(fidelity=True), text_options()], add_parser,
                   summary="next-token agreement and KL of merged against base on real texts")
    p.add_argument("--prefixes", type=listed,
                   help="prefix lengths in tokens, comma-separated (default: 64..512 on CPU, 32..1024 on GPU)")
    p.add_argument("--methods", type=listed, default=",".join(INTERPOLATIONS),
                   help=f"comma-separated, of {', '.join(METHODS)} (default: every interpolation; drop is the control)")
    p.add_argument("--positions", type=listed, default=",".join(POSITION_MODES))
    p.add_argument("--continuation", type=whole(1), help="greedy tokens compared after each prefix")
    p.add_argument("--threshold", type=share, default=0.9,
                   help="top-1 agreement the recommended cutoff must keep (default 0.9)")
    return p


def fidelity_plan(args, engine) -> FidelityPlan:
    layers = engine.num_layers
    chosen = (schedules.parse(args.cutoffs) if args.cutoffs is not None
              else schedules.fidelity_defaults(layers, args.quick))
    schedules.check(chosen, layers)
    if args.prefixes is not None:
        prefixes = int_list(args.prefixes, "prefix")
    elif args.quick:
        prefixes = (64, 256)
    else:  # a CPU spends most of the grid's time on the longest prefix
        prefixes = (32, 64, 128, 256, 512, 1024) if engine.device.type == "cuda" else (64, 128, 256, 512)
    plan = FidelityPlan(
        prefixes=prefixes,
        schedules=tuple(chosen),
        methods=str_list(args.methods, METHODS, "method"),
        positions=str_list(args.positions, POSITION_MODES, "positions mode"),
        choices=str_list(args.choice, CHOICES, "pair choice"),
        proportional=PROPORTIONAL[args.proportional],
        ratio=args.ratio,
        continuation=args.continuation or (4 if args.quick else 16),
        keep_start=args.keep_start,
        keep_end=args.keep_end,
        keep_recent=args.keep_recent,
    )
    plan.settings()  # every setting of the grid through the library's parser, before any work: one line if bad
    return plan


def fidelity_texts(args, engine, plan: FidelityPlan):
    if args.shape:  # random weights have no tokenizer and nothing to be faithful to: exercise the code only
        if args.texts:
            raise ValueError("--texts needs a model with a tokenizer; --shape builds one with random weights")
        print("note: --shape has random weights; fidelity figures from it mean nothing", file=sys.stderr)
        return random_texts(engine.config.vocab_size, 2 if args.quick else 4, max(plan.prefixes), args.seed)
    texts = tokenize(engine.tokenizer, read_texts(args.texts))
    return texts[:2] if args.quick else texts


def fidelity_result(rows: list[dict], num_layers: int, threshold: float) -> dict:
    summary = summarise(rows)
    by_prefix = summarise(rows, ("schedule", *VARIANT_KEYS, "prefix"))
    best = best_combination(summary, num_layers)
    if best:
        best["earliest_cutoff"] = earliest_cutoff(summary, best, num_layers, threshold)
        best["threshold"] = threshold
    return {"summary": summary, "by_prefix": by_prefix, "best": best}


def fidelity_tables(result: dict) -> str:
    summary, best = result["summary"], result["best"]
    grid = {}
    for r in summary:
        grid.setdefault(r["schedule"], {"schedule": r["schedule"]})[variant_label(r)] = r["top1"]
    labels = list(dict.fromkeys(variant_label(r) for r in summary))
    columns = [("schedule", "cutoff", "")] + [(v, v, ".2f") for v in labels]
    parts = ["top-1 agreement with the base model's next token:", report.format_table(list(grid.values()), columns)]
    if best:
        rows = [r for r in summary if same_variant(r, best)]
        parts += [
            f"\nbest by KL rank over the schedules that merge: {best['label']}"
            f" (mean rank {best['kl_rank']:.2f}, top-1 {best['top1']:.3f}, KL {best['kl_mean']:.4f})",
            report.format_table(rows, [
                ("schedule", "cutoff", ""), ("samples", "n", ""), ("top1", "top-1", ".3f"), ("top5", "top-5", ".3f"),
                ("top5_overlap", "top-5 overlap", ".3f"), ("kl_mean", "KL mean", ".4f"),
                ("kl_median", "KL median", ".4f"), ("tokens_to_divergence_mean", "tokens to diverge", ".1f"),
                ("censored_share", "never diverged", ".0%")]),
            "\nranking (means over the schedules that merge; KL rank 1 = lowest KL at every cutoff):",
            report.format_table(best["ranking"], [("label", "variant", ""), ("kl_rank", "KL rank", ".2f"),
                                                  ("top1", "top-1", ".3f"),
                                                  ("kl_mean", "KL mean", ".4f"),
                                                  ("tokens_to_divergence_mean", "tokens to diverge", ".2f")]),
            f"\nearliest single-stage cutoff keeping top-1 >= {best['threshold']:.2f} for {best['label']}: "
            f"{'none measured' if best['earliest_cutoff'] is None else best['earliest_cutoff']}",
        ]
    return "\n".join(parts)


def write_fidelity_report(out: Path, rows: list[dict], result: dict, plan: FidelityPlan, machine: dict, model: dict,
                          texts: list) -> str:
    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(out / "fidelity.csv", rows, FIDELITY_COLUMNS)
    report.write_csv(out / "fidelity_summary.csv", result["summary"], SUMMARY_COLUMNS)
    report.write_json(out / "fidelity.json", {
        "benchmark": "fidelity", "machine": machine, "model": model, "plan": asdict(plan),
        "texts": [{"name": t.name, "tokens": int(t.ids.shape[-1])} for t in texts],
        "best": result["best"], "summary": result["summary"], "by_prefix": result["by_prefix"], "rows": rows,
    })
    figures = [report.fidelity_figure(result["summary"])]
    if result["best"]:
        best = result["best"]
        points = [r for r in result["by_prefix"] if same_variant(r, best)]
        figures.append(report.fidelity_heatmap(points, best["label"]))
    notes = ["Each merged setting is compared with the base model on the same prefix: top-1 = same next token; "
             "top-5 = base's token within merged's top 5; KL(base ‖ merged); tokens to diverge = greedy cached "
             f"continuations agree for this many of {plan.continuation} tokens. "
             f"Texts: {', '.join(t.name for t in texts)}; prefixes {', '.join(map(str, plan.prefixes))} tokens."]
    report.write_html(out / "fidelity.html", f"slerpviz fidelity: {model['name']}", machine, figures, notes)
    return fidelity_tables(result)


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """`python -m slerpviz.bench fidelity` with `argv` (the words after `fidelity`); `args`: already parsed."""
    args = args if args is not None else parser().parse_args(argv)
    return guarded(args, lambda: measure(args, ["fidelity", *(argv or [])]))


def measure(args, argv: list[str]) -> int:
    """The grid the options ask for, run, written and printed; `argv`, the command line, goes in the report."""
    engine, name = build_engine(args)
    plan = fidelity_plan(args, engine)
    texts = fidelity_texts(args, engine, plan)
    machine, model = machine_info(engine.device, argv), describe_model(engine, name)
    began = time.perf_counter()
    rows = run_fidelity(engine, texts, plan, log=lambda m: print(m, file=sys.stderr))
    result = fidelity_result(rows, engine.num_layers, args.threshold)
    print(f"fidelity on {machine['gpu'] or machine['cpu']} ({machine['device']}, torch {machine['torch']}), "
          f"model {name}, {len(texts)} texts, {time.perf_counter() - began:.0f} s")
    print(write_fidelity_report(args.out, rows, result, plan, machine, model, texts))
    print(f"\nwrote {args.out / 'fidelity.csv'}, fidelity_summary.csv, fidelity.json, fidelity.html")
    return 0
