"""python -m slerpviz.bench speed|fidelity|frontier [--model NAME | --shape SHAPE] [--quick] [--out DIR] [...]

Writes DIR/<benchmark>.csv, .json and .html and prints a short table. `--quick` is a smoke run sized to finish in
under three minutes on a 2-core CPU with the embedded model; without it the grid is the README's.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..merge import CHOICES, METHODS, POSITION_MODES
from ..models import EMBEDDED
from . import report, schedules
from .engines import SHAPES, named_engine, random_weight_engine
from .fidelity import (FIDELITY_COLUMNS, SUMMARY_COLUMNS, VARIANT_KEYS, FidelityPlan, best_combination,
                       earliest_cutoff, run_fidelity, same_variant, summarise, variant_label)
from .limits import Shape
from .machine import machine_info
from .speed import MODES, REPEAT_COLUMNS, SPEED_COLUMNS, SpeedPlan, run_speed
from .texts import random_texts, read_texts, tokenize

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROPORTIONAL = {"off": (False,), "on": (True,), "both": (False, True)}


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m slerpviz.bench", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("benchmark", choices=("speed", "fidelity", "frontier", "retrieval"),
                   help="frontier and retrieval: see python -m slerpviz.bench frontier --help (or retrieval)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="an allow-listed model name (default: the embedded SmolLM2-135M-Instruct)")
    which.add_argument("--shape", choices=SHAPES,
                       help="random weights of a known shape instead of a trained model: mistral-7b (use with "
                            "--device cuda) times real sizes; tiny is for tests")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, help="for --shape: default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--quick", action="store_true", help="a small grid that runs in under three minutes on a CPU")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for the CSV, JSON and HTML files")
    p.add_argument("--cutoffs", help="schedules, comma-separated; 7+15 is a two-stage schedule (default: by model)")
    p.add_argument("--ratio", type=float, default=1.0, help="share of eligible pairs merged at each cutoff")
    p.add_argument("--choice", default="consecutive",
                   help=f"which pairs merge: {', '.join(CHOICES)}; fidelity takes a comma-separated list")
    p.add_argument("--proportional", choices=PROPORTIONAL, default="off",
                   help="proportional attention (log of tokens held added to merged keys); fidelity takes both")
    p.add_argument("--keep-start", type=int, default=0, help="protected tokens at the start")
    p.add_argument("--keep-end", type=int, default=0, help="protected tokens at the end")
    p.add_argument("--attention-window", type=int, default=32,
                   help="attention choice: the last W prompt tokens whose attention scores the others")
    p.add_argument("--attention-keep", type=int, default=0,
                   help="attention choice: the most-attended tokens that never merge")
    p.add_argument("--preset", help="speed: time a named preset of slerpviz.presets (its cutoffs, ratios, choice and "
                                    "protection) instead of --cutoffs/--ratio/--choice")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int,
                   help="CPU threads for torch (default: torch's choice; 1 with --quick on a CPU). On a CPU shared "
                        "with other jobs 1 is faster and far steadier: threads waiting on a busy core stall each other")
    speed = p.add_argument_group("speed")
    speed.add_argument("--lengths", help="prompt lengths, comma-separated (default: 128..4096 on CPU, ..16384 on GPU)")
    speed.add_argument("--repeats", type=int, help="timed repeats of every variant (default 3; 5 on a GPU)")
    speed.add_argument("--new-tokens", type=int, help="tokens generated per cached run, the first included")
    speed.add_argument("--recompute-new-tokens", type=int, help="tokens generated per run without cache")
    speed.add_argument("--recompute-max-length", type=int,
                       help="skip the no-cache pair above this length (default 2048 on CPU, none on GPU)")
    speed.add_argument("--modes", default=",".join(MODES), help="cached, recompute or both")
    speed.add_argument("--method", default="slerp", choices=METHODS, help="merge method timed")
    speed.add_argument("--position-mode", default="mean", choices=POSITION_MODES, help="positions mode timed")
    fidelity = p.add_argument_group("fidelity")
    fidelity.add_argument("--texts", type=Path, action="append",
                          help="a text file (texts separated by '---' lines) or a folder of .txt; repeatable "
                               "(default: assets/texts)")
    fidelity.add_argument("--prefixes", help="prefix lengths in tokens, comma-separated (default: 64..512 on CPU, "
                                             "32..1024 on GPU)")
    fidelity.add_argument("--methods", default=",".join(METHODS))
    fidelity.add_argument("--positions", default=",".join(POSITION_MODES))
    fidelity.add_argument("--continuation", type=int, help="greedy tokens compared after each prefix")
    fidelity.add_argument("--threshold", type=float, default=0.9,
                          help="top-1 agreement the recommended cutoff must keep (default 0.9)")
    return p


def int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.replace(" ", "").split(",") if x)


def str_list(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    items = tuple(x for x in text.replace(" ", "").split(",") if x)
    for item in items:
        if item not in allowed:
            raise SystemExit(f"unknown {what} {item!r}; choose from {', '.join(allowed)}")
    return items


# ----------------------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------------------


def device_of(args) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def on_gpu(args) -> bool:
    return device_of(args).startswith("cuda")


def build_engine(args):
    device = device_of(args)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but this machine has no CUDA GPU")
    if args.shape:
        engine = random_weight_engine(args.shape, device, DTYPES.get(args.dtype), args.seed)
        return engine, f"{args.shape} (random weights)"
    name = args.model or EMBEDDED
    return named_engine(name, device), name


def describe_model(engine, name: str) -> dict:
    dtype = engine.decoder.embed_tokens.weight.dtype
    return {"name": name, "family": engine.config.model_type, "dtype": str(dtype).removeprefix("torch."),
            **asdict(Shape.from_config(engine.config, dtype))}


# ----------------------------------------------------------------------------------------------------------------
# speed
# ----------------------------------------------------------------------------------------------------------------


def speed_plan(args, engine) -> SpeedPlan:
    gpu = engine.device.type == "cuda"
    layers = engine.num_layers
    if args.lengths:
        lengths = int_list(args.lengths)
    elif args.quick:
        lengths = (128, 512)
    else:
        lengths = (128, 256, 512, 1024, 2048, 4096, 8192, 16384) if gpu else (128, 256, 512, 1024, 2048, 4096)
        context = getattr(engine.config, "max_position_embeddings", None) or lengths[-1] + 64
        lengths = tuple(n for n in lengths if n + 64 <= context)  # the model's context bounds the default
    chosen = schedules.parse(args.cutoffs) if args.cutoffs else schedules.speed_defaults(layers, args.quick)
    variant = dict(keep_start=args.keep_start, keep_end=args.keep_end, ratio=args.ratio,
                   attention_window=args.attention_window, attention_keep=args.attention_keep,
                   choice=one_of(str_list(args.choice, CHOICES, "pair choice"), "--choice"))
    if args.preset:
        from ..presets import preset

        settings = preset(args.preset, layers)
        chosen = [settings.cutoffs]
        variant = {key: getattr(settings, key) for key in variant}
    schedules.check(chosen, layers)
    return SpeedPlan(
        lengths=lengths,
        schedules=tuple(chosen),
        modes=str_list(args.modes, MODES, "mode"),
        repeats=args.repeats or (3 if args.quick or not gpu else 5),
        new_tokens=args.new_tokens or (8 if args.quick else 16),
        recompute_new_tokens=args.recompute_new_tokens or (3 if args.quick else 4),
        recompute_max_length=args.recompute_max_length or (None if gpu or args.quick else 2048),
        method=args.method,
        positions=args.position_mode,
        proportional=one_of(PROPORTIONAL[args.proportional], "--proportional"),
        seed=args.seed,
        **variant,
    )


def one_of(values: tuple, flag: str):
    """Speed times one merge variant; a list is for fidelity's grid."""
    if len(values) != 1:
        raise SystemExit(f"speed times one variant: give {flag} a single value")
    return values[0]


SPEED_TABLE = [
    ("length", "len", ""), ("schedule", "cutoff", ""), ("mode", "mode", ""),
    ("base_ttft_s", "TTFT base s", ".3f"), ("merged_ttft_s", "merged s", ".3f"), ("ttft_speedup", "x", ".2f"),
    ("ttft_speedup_limit", "limit", ".2f"), ("ttft_achieved_over_limit", "x/limit", ".2f"),
    ("base_decode_ms", "decode base ms", ".1f"), ("merged_decode_ms", "merged ms", ".1f"),
    ("decode_speedup", "x", ".2f"), ("decode_speedup_limit", "limit", ".2f"),
    ("decode_speedup_vs_base_cached", "x vs cached base", ".2f"),
    ("kv_fraction", "KV frac", ".3f"), ("kv_fraction_limit", "limit", ".3f"), ("merge_share", "merge share", ".1%"),
]


def write_speed_report(out: Path, result, plan: SpeedPlan, machine: dict, model: dict) -> str:
    """The files, and the table to print."""
    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(out / "speed.csv", result.rows, SPEED_COLUMNS)
    report.write_json(out / "speed.json", {
        "benchmark": "speed", "machine": machine, "model": model, "plan": asdict(plan), "rows": result.rows,
        "repeats": result.repeats, "hf_sanity": result.hf_sanity, "repeat_columns": REPEAT_COLUMNS,
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
    return f"{table}\n\nsanity, one plain HF forward vs the engine's base prefill (seconds): {sanity}"


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
    chosen = schedules.parse(args.cutoffs) if args.cutoffs else schedules.fidelity_defaults(layers, args.quick)
    schedules.check(chosen, layers)
    if args.prefixes:
        prefixes = int_list(args.prefixes)
    elif args.quick:
        prefixes = (64, 256)
    else:  # a CPU spends most of the grid's time on the longest prefix
        prefixes = (32, 64, 128, 256, 512, 1024) if engine.device.type == "cuda" else (64, 128, 256, 512)
    return FidelityPlan(
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["frontier"]:  # the speed x fidelity frontier has its own options
        from .frontier import frontier_main

        return frontier_main(argv[1:])
    if argv[:1] == ["snapshot"]:  # python -m slerpviz.bench snapshot REPORT.html PICTURE.png
        if len(argv) != 3:
            print("usage: python -m slerpviz.bench snapshot REPORT.html PICTURE.png", file=sys.stderr)
            return 2
        report.write_png(Path(argv[1]), Path(argv[2]))
        return 0
    if argv[:1] == ["retrieval"]:
        from .retrieval_command import retrieval_main

        return retrieval_main(argv[1:])
    args = parser().parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.quick and not on_gpu(args):
        torch.set_num_threads(1)  # a smoke run must finish in time on a busy machine; see --threads
    try:
        return speed_main(args, argv) if args.benchmark == "speed" else fidelity_main(args, argv)
    except (ValueError, FileNotFoundError) as error:  # bad settings or paths: say what is wrong, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # called from Python (tests), leave the process as it was
