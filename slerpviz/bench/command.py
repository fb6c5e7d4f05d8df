"""python -m slerpviz.bench speed|fidelity|frontier|retrieval|locate [--model NAME | --shape SHAPE] [--quick] [...]

Writes DIR/<benchmark>.csv, .json and .html and prints a short table. `--quick` is a smoke run sized to finish in
under three minutes on a 2-core CPU with the embedded model; without it the grid is docs/measurements.md's.
`python -m slerpviz.bench snapshot REPORT.html PICTURE.png` draws a report as a picture.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from ..decode import DECODE_MODES
from .. import settings as checks
from ..settings import Parser
from ..merge import CHOICES, METHODS, POSITION_MODES
from . import report, schedules
from .fidelity import (FIDELITY_COLUMNS, SUMMARY_COLUMNS, VARIANT_KEYS, FidelityPlan, best_combination,
                       earliest_cutoff, run_fidelity, same_variant, summarise, variant_label)
from .frontier import frontier_main, frontier_parser
from .machine import commit_at_start, machine_info
from .options import (CHOICES_HELP, PROG, build_engine, check_out, describe_model, given, int_list,
                      interpolation_options, listed, merge_options, merge_settings, model_options, one_of, run_options,
                      share, str_list, subcommand, text_options, torch_threads, whole)
from .locate import locate_main
from .locate import parser as locate_parser
from .retrieval_command import retrieval_main
from .retrieval_command import parser as retrieval_parser
from .speed import MODES, REPEAT_COLUMNS, SPEED_COLUMNS, SpeedPlan, run_speed
from .texts import random_texts, read_texts, tokenize

PROPORTIONAL = {"off": (False,), "on": (True,), "both": (False, True)}


# ----------------------------------------------------------------------------------------------------------------
# Arguments: the shared options come from .options; each subcommand adds its own
# ----------------------------------------------------------------------------------------------------------------


def speed_fidelity_parents(fidelity: bool) -> list[argparse.ArgumentParser]:
    """What speed and fidelity share: the model, the run, one merge setting and proportional attention."""
    proportional = argparse.ArgumentParser(add_help=False)
    proportional.add_argument("--proportional", choices=PROPORTIONAL, default="off",
                              help="proportional attention (log of tokens held added to merged keys); fidelity "
                                   "takes both")
    return [
        model_options("random weights of a known shape instead of a trained model: mistral-7b (use with "
                      "--device cuda) times real sizes; tiny is for tests",
                      "for --shape: the random weights and texts" if fidelity else
                      "the random prompts (and, for --shape, the random weights)"),
        run_options("a small grid that runs in under three minutes on a CPU",
                    threads_default="torch's choice; 1 with --quick on a CPU"),
        merge_options("schedules, comma-separated; 7+15 is a two-stage schedule (default: by model)",
                      CHOICES_HELP + ("; a comma-separated list for a grid (attention with W 32, no budget)"
                                      if fidelity else ""),
                      attention=not fidelity),  # fidelity's grid has no attention window or budget
        proportional,
    ]


def speed_parser(add_parser=None) -> argparse.ArgumentParser:
    description = __doc__.split("\n\n")[1]
    parents = [*speed_fidelity_parents(fidelity=False), interpolation_options("the merged variants timed")]
    p = subcommand("speed", description, parents, add_parser,
                   summary="time base and merged: prefill, decoding, KV cache, against the limits from the config")
    p.add_argument("--preset", type=listed,
                   help="speed: time named presets of slerpviz.presets, comma-separated (their cutoffs, ratios, "
                        "choice and protection), beside any --cutoffs schedules")
    p.add_argument("--lengths", type=listed,
                   help="prompt lengths, comma-separated (default: 128..4096 on CPU, ..16384 on GPU)")
    p.add_argument("--repeats", type=whole(1), help="timed repeats of every variant (default 3; 5 on a GPU)")
    p.add_argument("--new-tokens", type=whole(1), help="tokens generated per cached run, the first included")
    p.add_argument("--recompute-new-tokens", type=whole(1), help="tokens generated per run without cache")
    p.add_argument("--recompute-max-length", type=whole(1),
                   help="skip the no-cache pair above this length (default 2048 on CPU, none on GPU)")
    p.add_argument("--modes", type=listed, default=",".join(MODES), help="cached, recompute or both")
    p.add_argument("--decode", type=listed,
                   help="how cached runs decode, comma-separated: dynamic (a growing cache, per-step masks), static "
                        "(fixed buffers, nothing made on the host per step), compiled (static, captured as a CUDA "
                        "graph by torch.compile; its compile time is reported apart). Default: dynamic on a CPU, "
                        "dynamic,compiled on a GPU")
    p.set_defaults(run=benchmark_main(speed_main))
    return p


def fidelity_parser(add_parser=None) -> argparse.ArgumentParser:
    description = __doc__.split("\n\n")[1]
    p = subcommand("fidelity", description, [*speed_fidelity_parents(fidelity=True), text_options()], add_parser,
                   summary="next-token agreement and KL of merged against base on real texts")
    p.add_argument("--prefixes", type=listed,
                   help="prefix lengths in tokens, comma-separated (default: 64..512 on CPU, 32..1024 on GPU)")
    p.add_argument("--methods", type=listed, default=",".join(METHODS))
    p.add_argument("--positions", type=listed, default=",".join(POSITION_MODES))
    p.add_argument("--continuation", type=whole(1), help="greedy tokens compared after each prefix")
    p.add_argument("--threshold", type=share, default=0.9,
                   help="top-1 agreement the recommended cutoff must keep (default 0.9)")
    p.set_defaults(run=benchmark_main(fidelity_main))
    return p


def snapshot_parser(add_parser) -> argparse.ArgumentParser:
    p = add_parser("snapshot", help="a report as a picture, through Debian's chromium",
                   description="Draw an HTML report as a PNG picture, through Debian's chromium.")
    p.add_argument("report", type=Path, help="an .html report written by a benchmark")
    p.add_argument("picture", type=Path, help="the .png to write")
    p.set_defaults(run=snapshot_main)
    return p


def snapshot_main(args, argv=None) -> int:
    report.write_png(args.report, args.picture)
    return 0


def parser() -> argparse.ArgumentParser:
    """`python -m slerpviz.bench SUBCOMMAND [...]`; `python -m slerpviz.bench SUBCOMMAND --help` lists its options."""
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="benchmark", required=True)
    speed_parser(commands.add_parser)
    fidelity_parser(commands.add_parser)
    frontier_parser(commands.add_parser).set_defaults(run=lambda args, argv: frontier_main(argv[1:], args))
    retrieval_parser(commands.add_parser).set_defaults(run=lambda args, argv: retrieval_main(argv[1:], args))
    locate_parser(commands.add_parser).set_defaults(run=lambda args, argv: locate_main(argv[1:], args))
    snapshot_parser(commands.add_parser)
    return p


# ----------------------------------------------------------------------------------------------------------------
# speed
# ----------------------------------------------------------------------------------------------------------------


def speed_plan(args, engine) -> SpeedPlan:
    gpu = engine.device.type == "cuda"
    layers = engine.num_layers
    if args.lengths is not None:
        lengths = int_list(args.lengths)
    elif args.quick:
        lengths = (128, 512)
    else:
        lengths = (128, 256, 512, 1024, 2048, 4096, 8192, 16384) if gpu else (128, 256, 512, 1024, 2048, 4096)
        context = getattr(engine.config, "max_position_embeddings", None) or lengths[-1] + 64
        lengths = tuple(n for n in lengths if n + 64 <= context)  # the model's context bounds the default
    chosen = (schedules.parse(args.cutoffs) if args.cutoffs is not None
              else [] if args.preset is not None else schedules.speed_defaults(layers, args.quick))
    choice = one_of(str_list(args.choice, CHOICES, "pair choice"), "--choice")
    proportional = one_of(PROPORTIONAL[args.proportional], "--proportional")
    merge = merge_settings(args, None, choice=choice, proportional=proportional)  # every schedule's, cutoffs aside
    for schedule in chosen:
        checks.ratio_count(merge.ratio, schedule)  # per-cutoff ratios: one for each cutoff of every schedule
    named = []
    if args.preset is not None:
        from ..presets import PRESETS, preset

        for name in str_list(args.preset, tuple(PRESETS), "preset"):
            settings = preset(name, layers)
            # The preset replaces the merge flags; --method, --positions and --proportional still say how its
            # slots are made.
            named.append((name, replace(settings, method=args.method, positions=args.positions,
                                        proportional=proportional)))
    schedules.check(chosen, layers)
    return SpeedPlan(
        lengths=lengths,
        schedules=tuple(chosen),
        modes=str_list(args.modes, MODES, "mode"),
        repeats=args.repeats or (3 if args.quick or not gpu else 5),
        new_tokens=args.new_tokens or (8 if args.quick else 16),
        recompute_new_tokens=args.recompute_new_tokens or (3 if args.quick else 4),
        recompute_max_length=args.recompute_max_length or (None if gpu or args.quick else 2048),
        merge=merge,
        seed=args.seed,
        named=tuple(named),
        decodes=(str_list(args.decode, DECODE_MODES, "decode") if args.decode is not None
                 else ("dynamic", "compiled") if gpu else ("dynamic",)),
    )


SPEED_TABLE = [
    ("length", "len", ""), ("schedule", "cutoff", ""), ("mode", "mode", ""), ("decode", "decode", ""),
    ("base_ttft_s", "TTFT base s", ".3f"), ("merged_ttft_s", "merged s", ".3f"), ("ttft_speedup", "x", ".2f"),
    ("ttft_speedup_limit", "limit", ".2f"), ("ttft_achieved_over_limit", "x/limit", ".2f"),
    ("base_decode_ms", "decode base ms", ".1f"), ("merged_decode_ms", "merged ms", ".1f"),
    ("decode_speedup", "x", ".2f"), ("decode_speedup_limit", "limit", ".2f"),
    ("decode_speedup_vs_base_cached", "x vs cached base", ".2f"),
    ("kv_fraction", "KV frac", ".3f"), ("kv_fraction_limit", "limit", ".3f"), ("merge_share", "merge share", ".1%"),
    ("merge_ms", "merge ms", ".2f"), ("merge_gpu_ms", "kernels ms", ".2f"), ("merge_syncs", "syncs", ""),
    ("merge_ops_per_stage", "ops/stage", ".0f"), ("merged_decode_syncs", "decode syncs", ""),
]


def write_speed_report(out: Path, result, plan: SpeedPlan, machine: dict, model: dict) -> str:
    """The files, and the table to print."""
    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(out / "speed.csv", result.rows, SPEED_COLUMNS)
    report.write_json(out / "speed.json", {
        "benchmark": "speed", "machine": machine, "model": model, "plan": asdict(plan), "rows": result.rows,
        "repeats": result.repeats, "hf_sanity": result.hf_sanity, "repeat_columns": REPEAT_COLUMNS,
        "decode_compile_s": result.compile_s,
        "definitions": SPEED_DEFINITIONS,
    })
    notes = [
        "Speed-ups are base time ÷ merged time (above 1 = merged is faster); medians over interleaved repeats. "
        "Limits come from the config: FLOPs for prefill and for decoding without cache, bytes read per step for "
        "cached decoding. 'cached' compares base with KV cache against merged with its shorter cache; 'recompute' "
        "is the article's setting: base without cache against merged re-merging every step.",
        f"Peak memory: {memory_note(result.rows)}",
    ]
    report.write_html(out / "speed.html", f"slerpviz speed: {model['name']}", machine,
                      [report.speed_figure(result.rows)], notes)
    table = report.format_table(result.rows, SPEED_TABLE)
    sanity = "; ".join(
        f"{s['length']}: HF {s['hf_forward_s']:.3f} s vs engine base {s['engine_base_ttft_s']:.3f} s"
        for s in result.hf_sanity if s["engine_base_ttft_s"] is not None)
    compiled = "; ".join(f"{decode} {seconds:.1f} s" for decode, seconds in result.compile_s.items() if seconds)
    compiled = f"\ndecode compiled and captured once, before any timed run: {compiled}" if compiled else ""
    return f"{table}\n\nsanity, one plain HF forward vs the engine's base prefill (seconds): {sanity}{compiled}"


def memory_note(rows: list[dict]) -> str:
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
    "merge_ops_per_stage": "aten ops one merge dispatches (TorchDispatchMode, nested calls not counted) ÷ stages",
    "base_decode_syncs": "host syncs in one cached decode step of base, the sampler's token read not included",
    "merged_decode_syncs": "the same for the merged variant",
    "base_decode_ops": "aten ops one cached decode step of base dispatches",
    "merged_decode_ops": "the same for the merged variant",
    "peak_mem_bytes": "see peak_mem_kind: cuda_allocated (exact) or cpu_rss_delta (rough); empty = not measurable",
}


def speed_main(args, argv=None) -> int:
    engine, name = build_engine(args)
    plan = speed_plan(args, engine)
    machine, model = machine_info(engine.device, argv), describe_model(engine, name)
    began = time.perf_counter()
    result = run_speed(engine, plan, log=lambda m: print(m, file=sys.stderr))
    print(f"speed on {machine['gpu'] or machine['cpu']} ({machine['device']}, torch {machine['torch']}), "
          f"model {name}, {time.perf_counter() - began:.0f} s")
    print(write_speed_report(args.out, result, plan, machine, model))
    print(f"\nwrote {args.out / 'speed.csv'}, speed.json, speed.html")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# fidelity
# ----------------------------------------------------------------------------------------------------------------


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


def fidelity_main(args, argv=None) -> int:
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


def benchmark_main(run):
    """speed or fidelity with --threads in force (1 for --quick on a CPU), and bad settings or paths as one line."""
    def main(args, argv) -> int:
        with torch_threads(args, one_when_quick=True):
            try:
                check_out(args.out)
                return run(args, argv)
            except (ValueError, FileNotFoundError) as error:  # bad settings or paths: say what is wrong, no traceback
                print(f"error: {error}", file=sys.stderr)
                return 2

    return main


def main(argv: list[str] | None = None) -> int:
    commit_at_start()  # the code this run is: read now, before an hour of work
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    return args.run(args, argv)
