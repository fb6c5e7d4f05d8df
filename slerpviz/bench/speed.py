"""Speed: time to first token, decode time per token, memory and KV-cache size, base against merged, beside the
limits the config allows.

Two pairs are compared, in the same run:
  cached     base with its KV cache        vs  merged with its (shorter) per-layer KV cache
  recompute  base without any cache        vs  merged, re-planned and re-merged every step (the article's setting)
Within a pair the variants are interleaved repeat by repeat (base, merged, merged', …, then reversed), so a machine
that slows down or speeds up during the run charges every variant alike; each figure is a median over repeats.
Below the run, `python -m slerpviz.bench speed`: its parser, its plan from the options, its files and its main.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .. import settings as checks
from ..engine import MergeSettings, MergingEngine, Sampling
from ..merge import CHOICES
from . import limits, report, schedules
from .engines import never_stops
from .machine import PeakMemory, machine_info
from .. import decode as static_decode
from .ops import host_work
from .options import (DESCRIPTION, PROPORTIONAL, build_engine, check_flags_taken, describe_model, guarded,
                      int_list, interpolation_options, listed, merge_settings, one_of, speed_fidelity_parents,
                      str_list, subcommand, whole)
from .schedules import BASE, Schedule, label

MODES = ("cached", "recompute")

SPEED_COLUMNS = (
    "length", "merged_length", "schedule", "stages", "first_cutoff", "mode", "decode", "repeats", "new_tokens",
    "base_ttft_s", "merged_ttft_s", "ttft_speedup", "ttft_speedup_limit", "ttft_achieved_over_limit",
    "base_decode_ms", "merged_decode_ms", "decode_speedup", "decode_speedup_limit", "decode_achieved_over_limit",
    "decode_speedup_vs_base_cached",
    "base_kv_bytes", "merged_kv_bytes", "kv_fraction", "kv_fraction_limit", "kv_achieved_over_limit",
    "base_peak_mem_bytes", "merged_peak_mem_bytes", "peak_mem_kind",
    "merge_ms", "merge_share",
    # What the merge and a decode step ask of the host (bench/ops.py): aten ops and host syncs, and on a GPU the
    # kernels launched and their time on the device.
    "merge_gpu_ms", "merge_kernels", "merge_syncs", "merge_ops_per_stage",
    "base_decode_syncs", "merged_decode_syncs", "base_decode_ops", "merged_decode_ops",
    # One prefill on this row's path (eager or compiled): aten ops and syncs, and on a GPU its kernels and their time.
    "base_prefill_ops", "merged_prefill_ops", "base_prefill_syncs", "merged_prefill_syncs",
    "base_prefill_kernels", "merged_prefill_kernels", "base_prefill_gpu_ms", "merged_prefill_gpu_ms",
    # The static decoder's setup per run (its buffers, the cache's copy, a CUDA graph recorded for a new size),
    # never inside a step's time; compiling is once per process and structure (SpeedResult.compile_s).
    "base_decode_setup_s", "merged_decode_setup_s",
    "prefill",  # eager, or compiled: the prompt's layers and merges through torch.compile, both sides (--prefill)
)

REPEAT_COLUMNS = ("length", "mode", "decode", "prefill", "variant", "repeat", "ttft_s", "decode_ms", "kv_bytes",
                  "peak_mem_bytes", "decode_setup_s", "decode_path")


@dataclass(frozen=True)
class SpeedPlan:
    """What to measure. `new_tokens` counts the first token too: a run of 8 times 1 prefill and 7 decode steps."""

    lengths: tuple[int, ...]
    schedules: tuple[Schedule, ...]
    modes: tuple[str, ...] = MODES
    repeats: int = 3
    new_tokens: int = 8
    recompute_new_tokens: int = 3
    recompute_max_length: int | None = None  # longer prompts skip recompute: every step there is a full prefill
    merge_repeats: int = 10
    merge: MergeSettings = MergeSettings()  # how every schedule merges; its own cutoffs are ignored
    seed: int = 0
    warmup: bool = True
    # Variants with settings of their own (the presets), timed beside the schedules: label -> settings.
    named: tuple[tuple[str, MergeSettings], ...] = ()
    profile: bool = True  # count ops and syncs of one merge and one decode step (never inside a timed run)
    # How the cached runs decode (slerpviz.decode): each is timed for base and every variant alike.
    decodes: tuple[str, ...] = ("dynamic",)
    # How the prompt's layers run (settings.PREFILLS): each is timed for base and every variant alike.
    prefills: tuple[str, ...] = ("eager",)

    def settings(self, schedule: Schedule) -> MergeSettings:
        return replace(self.merge, cutoffs=schedule) if schedule else MergeSettings()

    def variants(self) -> list[tuple[str, MergeSettings]]:
        """The merged variants, labelled: each schedule under the shared merge settings, then the named ones."""
        return [(label(s), self.settings(s)) for s in self.schedules] + list(self.named)

    def modes_at(self, length: int) -> list[str]:
        too_long = self.recompute_max_length is not None and length > self.recompute_max_length
        return [m for m in self.modes if not (m == "recompute" and too_long)]

    def tokens_for(self, mode: str) -> int:
        return self.new_tokens if mode == "cached" else self.recompute_new_tokens

    def decodes_for(self, mode: str) -> tuple[str, ...]:
        return self.decodes if mode == "cached" else ("dynamic",)  # without a cache every step is a prefill


@dataclass
class SpeedResult:
    rows: list[dict]
    repeats: list[dict]
    hf_sanity: list[dict] = field(default_factory=list)
    # Per decode path, and "prefill" for --compile-prefill: compiling once per process, up front, in no run's time.
    compile_s: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# One timed run
# ----------------------------------------------------------------------------------------------------------------


def random_prompt(engine: MergingEngine, length: int, seed: int) -> torch.Tensor:
    """Token ids [1, length]: timings do not depend on which tokens they are."""
    generator = torch.Generator().manual_seed(seed + length)
    return torch.randint(0, engine.config.vocab_size, (1, length), generator=generator).to(engine.device)


def timed_run(engine: MergingEngine, ids: torch.Tensor, settings: MergeSettings, mode: str, new_tokens: int,
              memory: PeakMemory, decode: str = "dynamic") -> dict:
    """Generate `new_tokens` greedily; the engine times each step itself (synchronised on a GPU)."""
    run = engine.start(ids, settings, Sampling(max_new_tokens=new_tokens, temperature=0.0), mode, decode=decode)
    kv_bytes = None
    memory.start()
    with never_stops(engine):
        for index, _ in enumerate(run):
            if index == 0 and run.session.cache is not None:
                kv_bytes = sum(run.trace.kv_bytes_per_layer)  # the cache the prompt left, before decoding grows it
    peak = memory.peak()
    decode = run.trace.decode_s
    return {
        "ttft_s": run.trace.prefill_s,
        "decode_ms": 1000 * statistics.median(decode) if decode else None,
        "kv_bytes": kv_bytes,
        "peak_mem_bytes": peak,
        # What each layer ran on in this very prefill (the stages the merge chose from these hidden states).
        "layer_lengths": list(run.trace.seq_len_per_layer),
        "decode_setup_s": run.trace.decode_warmup_s,
        "decode_path": run.trace.decode,  # the path that ran: a static decode that could not run exactly says why
    }


def time_merge(engine: MergingEngine, length: int, settings: MergeSettings, repeats: int) -> float:
    """Seconds the merge itself takes in one prefill, on hidden states of the model's width and dtype (the values
    do not change the work). Median of `repeats`."""
    hidden = torch.randn(1, length, engine.config.hidden_size, dtype=engine.dtype, device=engine.device)
    with torch.inference_mode():
        engine.merge_only(hidden, settings)  # warm-up
        times = []
        for _ in range(repeats):
            engine.sync()
            began = time.perf_counter()
            engine.merge_only(hidden, settings)
            engine.sync()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def time_hf_forward(engine: MergingEngine, ids: torch.Tensor) -> float:
    """One plain Hugging Face forward without cache, last-position logits only: does the engine's base match it?"""
    with torch.inference_mode():
        engine.model(input_ids=ids, use_cache=False, logits_to_keep=1)  # warm-up: its own mask path, first call
        engine.sync()
        began = time.perf_counter()
        engine.model(input_ids=ids, use_cache=False, logits_to_keep=1)
        engine.sync()
    return time.perf_counter() - began


# ----------------------------------------------------------------------------------------------------------------
# The whole grid
# ----------------------------------------------------------------------------------------------------------------


def run_speed(engine: MergingEngine, plan: SpeedPlan, log=print) -> SpeedResult:
    for length in plan.lengths:
        for schedule in plan.schedules:
            engine.validate(length, plan.settings(schedule), Sampling(max_new_tokens=plan.new_tokens))
    memory = PeakMemory(engine.device)
    shape = limits.Shape.from_config(engine.config, engine.dtype)
    variants = plan.variants()
    repeats, rows, sanity = [], [], []
    compile_s = {}
    if "compiled" in plan.prefills:
        engine.compile_prefill()
        compile_s["prefill"] = engine.warm_up_prefill([MergeSettings(), *(s for _, s in variants)])
        log(f"speed: prefill compiled in {compile_s['prefill']:.1f} s (not in any run's time)")
    for decode in plan.decodes:  # compile and capture every structure once, before anything is timed
        compile_s[decode] = static_decode.warm_up(engine, [MergeSettings(), *(s for _, s in variants)], decode)
        if compile_s[decode]:
            log(f"speed: {decode} decode compiled and captured in {compile_s[decode]:.1f} s (not in any run's time)")
    for length in plan.lengths:
        ids = random_prompt(engine, length, plan.seed)
        if "compiled" in plan.prefills:  # a merge may compile again for a new count of pairs: not in a timed run
            with torch.inference_mode():
                for settings in (s for _, s in variants):
                    engine.prefill(ids, settings)
        if plan.warmup:  # first calls at a new size pay for kernel selection and allocator growth
            for settings in (MergeSettings(), variants[0][1]):
                for decode in plan.decodes:
                    for prefill in plan.prefills:
                        with engine.prefill_path(prefill):
                            timed_run(engine, ids, settings, "cached", 2, memory, decode)
        measured = {}
        for mode in plan.modes_at(length):
            for decode in plan.decodes_for(mode):
                for prefill in plan.prefills:
                    log(f"speed: length {length}, {mode}, {decode} decode, {prefill} prefill, {plan.repeats} "
                        f"repeats of base + {len(variants)} merged")
                    with engine.prefill_path(prefill):
                        runs = measure_interleaved(engine, ids, plan, mode, memory, decode)
                    measured[mode, decode, prefill] = runs
                    repeats += [{"length": length, "mode": mode, "decode": decode, "prefill": prefill,
                                 "variant": variant, "repeat": i, **r}
                                for variant, variant_runs in runs.items() for i, r in enumerate(variant_runs)]
        merge_s = {}
        for prefill in plan.prefills:  # the merge compiles with the layers
            with engine.prefill_path(prefill):
                merge_s.update({(name, prefill): time_merge(engine, length, settings, plan.merge_repeats)
                                for name, settings in variants})
        counted = host_work(engine, ids, variants, plan.decodes, plan.prefills) if plan.profile else {}
        for (mode, decode, prefill), runs in measured.items():
            for name, settings in variants:
                rows.append(speed_row(engine, shape, plan, length, name, settings, (mode, decode, prefill), runs,
                                      measured, merge_s[name, prefill], memory.kind,
                                      counted.get((name, decode, prefill), {}),
                                      counted.get((BASE, decode, prefill), {})))
        hf_s = time_hf_forward(engine, ids)
        first = next(iter(measured.values()), {})
        engine_s = median_of(measured.get(("recompute", "dynamic", "eager"), first).get(BASE, []), "ttft_s")
        sanity.append({"length": length, "hf_forward_s": hf_s, "engine_base_ttft_s": engine_s})
    return SpeedResult(rows, repeats, sanity, compile_s)


def measure_interleaved(engine, ids, plan: SpeedPlan, mode: str, memory: PeakMemory, decode: str = "dynamic"
                        ) -> dict[str, list[dict]]:
    """Every repeat runs base and each variant once; odd repeats run them in reverse order."""
    variants = [(BASE, MergeSettings()), *plan.variants()]
    runs: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for repeat in range(plan.repeats):
        for name, settings in variants if repeat % 2 == 0 else reversed(variants):
            runs[name].append(timed_run(engine, ids, settings, mode, plan.tokens_for(mode), memory, decode))
    return runs


def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def quotient(numerator, denominator) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def speed_row(engine: MergingEngine, shape: limits.Shape, plan: SpeedPlan, length: int, name: str,
              settings: MergeSettings, paths: tuple[str, str, str], runs: dict[str, list[dict]], measured: dict,
              merge_s: float, memory_kind: str | None, work: dict, base_work: dict) -> dict:
    """One (length, variant, mode, decode, prefill): medians of base and merged, their ratios, and the config's
    limits."""
    mode, decode, prefill = paths
    base, merged = runs[BASE], runs[name]
    new_tokens = plan.tokens_for(mode)
    limit = limits.variant_limits(shape, engine.num_layers, length, merged[0]["layer_lengths"], mode, new_tokens)
    base_ttft, merged_ttft = median_of(base, "ttft_s"), median_of(merged, "ttft_s")
    base_decode, merged_decode = median_of(base, "decode_ms"), median_of(merged, "decode_ms")
    base_kv, merged_kv = median_of(base, "kv_bytes"), median_of(merged, "kv_bytes")
    cached = (measured.get(("cached", decode, prefill))
              or next((r for (m, _, _), r in measured.items() if m == "cached"), {}))
    cached_base_decode = median_of(cached.get(BASE, []), "decode_ms")
    kv_fraction = quotient(merged_kv, base_kv)
    prefill_counts = {f"{side}_prefill_{key}": counts.get(f"prefill_{key}")
                      for side, counts in (("base", base_work), ("merged", work))
                      for key in ("ops", "syncs", "kernels", "gpu_ms")}
    return {
        "length": length,
        "merged_length": limit["merged_length"],
        "schedule": name,
        "stages": len(settings.cutoffs),
        "first_cutoff": min(settings.cutoffs),
        "mode": mode,
        "decode": decode,
        "repeats": plan.repeats,
        "new_tokens": new_tokens,
        "base_ttft_s": base_ttft,
        "merged_ttft_s": merged_ttft,
        "ttft_speedup": quotient(base_ttft, merged_ttft),
        "ttft_speedup_limit": limit["ttft"],
        "ttft_achieved_over_limit": quotient(quotient(base_ttft, merged_ttft), limit["ttft"]),
        "base_decode_ms": base_decode,
        "merged_decode_ms": merged_decode,
        "decode_speedup": quotient(base_decode, merged_decode),
        "decode_speedup_limit": limit["decode"],
        "decode_achieved_over_limit": quotient(quotient(base_decode, merged_decode), limit["decode"]),
        # The honest question for the article's setting: is merged-without-cache faster than base-with-cache?
        "decode_speedup_vs_base_cached": quotient(cached_base_decode, merged_decode),
        "base_kv_bytes": base_kv,
        "merged_kv_bytes": merged_kv,
        "kv_fraction": kv_fraction,
        "kv_fraction_limit": limit["kv"],
        "kv_achieved_over_limit": quotient(kv_fraction, limit["kv"]),
        "base_peak_mem_bytes": median_of(base, "peak_mem_bytes"),
        "merged_peak_mem_bytes": median_of(merged, "peak_mem_bytes"),
        "peak_mem_kind": memory_kind,
        "merge_ms": 1000 * merge_s,
        "merge_share": quotient(merge_s, merged_ttft),
        "merge_gpu_ms": work.get("merge_gpu_ms"),
        "merge_kernels": work.get("merge_kernels"),
        "merge_syncs": work.get("merge_syncs"),
        "merge_ops_per_stage": quotient(work.get("merge_ops"), len(settings.cutoffs)),
        "base_decode_syncs": base_work.get("decode_syncs"),
        "merged_decode_syncs": work.get("decode_syncs"),
        "base_decode_ops": base_work.get("decode_ops"),
        "merged_decode_ops": work.get("decode_ops"),
        **prefill_counts,
        "base_decode_setup_s": median_of(base, "decode_setup_s"),
        "merged_decode_setup_s": median_of(merged, "decode_setup_s"),
        "prefill": prefill,
    }


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------


def parser(add_parser=None) -> argparse.ArgumentParser:
    """Its own options on the shared ones of .options; `add_parser`: as a subcommand of python -m slerpviz.bench."""
    parents = [*speed_fidelity_parents(fidelity=False), interpolation_options("the merged variants timed")]
    p = subcommand("speed", DESCRIPTION, parents, add_parser,
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
    p.add_argument("--prefill", type=listed, default="eager",
                   help="how the prompt's layers and merges run, comma-separated: eager, compiled (each decoder "
                        "layer and merge through torch.compile with dynamic shapes: one graph for every layer and "
                        "length, one or two per merge, compiled before anything is timed, its time reported apart). "
                        "Each is timed for base and merged alike")
    return p


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
        decodes=(str_list(args.decode, static_decode.DECODE_MODES, "decode") if args.decode is not None
                 else ("dynamic", "compiled") if gpu else ("dynamic",)),
        prefills=str_list(args.prefill, checks.PREFILLS, "prefill"),
    )


def write_speed_report(out: Path, result, plan: SpeedPlan, machine: dict, model: dict) -> str:
    """The files, and the table to print."""
    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(out / "speed.csv", result.rows, SPEED_COLUMNS)
    report.write_json(out / "speed.json", {
        "benchmark": "speed", "machine": machine, "model": model, "plan": asdict(plan), "rows": result.rows,
        "repeats": result.repeats, "hf_sanity": result.hf_sanity, "repeat_columns": REPEAT_COLUMNS,
        "decode_compile_s": result.compile_s,
        "definitions": report.SPEED_DEFINITIONS,
    })
    report.write_html(out / "speed.html", f"slerpviz speed: {model['name']}", machine,
                      [report.speed_figure(result.rows)], report.speed_notes(result.rows))
    table = report.format_table(result.rows, report.SPEED_TABLE)
    sanity = "; ".join(
        f"{s['length']}: HF {s['hf_forward_s']:.3f} s vs engine base {s['engine_base_ttft_s']:.3f} s"
        for s in result.hf_sanity if s["engine_base_ttft_s"] is not None)
    compiled = "; ".join(f"{decode} {seconds:.1f} s" for decode, seconds in result.compile_s.items() if seconds)
    compiled = f"\ncompiled and captured once, before any timed run: {compiled}" if compiled else ""
    return f"{table}\n\nsanity, one plain HF forward vs the engine's base prefill (seconds): {sanity}{compiled}"


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """`python -m slerpviz.bench speed` with `argv` (the words after `speed`); `args`: already parsed."""
    args = args if args is not None else parser().parse_args(argv)
    return guarded(args, lambda: measure(args, ["speed", *(argv or [])]))


def measure(args, argv: list[str]) -> int:
    """The grid the options ask for, timed, written and printed; `argv`, the command line, goes in the report."""
    check_flags_taken(args)
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
