"""python -m slerpviz.bench patch [--quick] [--model NAME | --shape ...] [--lengths ...] [--preset ...] [--caches ...]
    [--batches ...]

The patch as its users run it: the model's own `generate`, plain and inside `slerpviz.merging`, with generate's
dynamic cache and with a static one (`cache_implementation="static"`: under the patch slerpviz's static decoder,
recorded as a CUDA graph on a GPU; plain, transformers' static cache, which generate compiles on a GPU). For each
prompt length, batch, variant and cache: the prefill (a generate of one new token), the time per decode step (the
rest of a longer generate, per step) and the tokens a second that makes for the whole batch, and what a decode step
asks of the host: aten ops dispatched, those beside the static step (which a CUDA graph replays as one launch on a
GPU), and reads back from the device (counted apart, never in a timed run). Each variant's patch is put on once per
block, warmed up by one untimed generate (compiling and recording there), and the blocks run in order and then in
reverse, so a machine that drifts charges every variant alike; figures are medians over repeats. Writes
DIR/patch.csv and patch.json and prints a table with n beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

from ..patch import merging
from ..presets import PRESETS, preset
from . import report
from .machine import machine_info
from .ops import OpCounter, profile_decode_step
from .options import build_engine, describe_model, guarded, int_list, listed, model_options, run_options, str_list
from .options import subcommand, whole
from .schedules import BASE

CACHES = ("dynamic", "static")
COLUMNS = ("length", "batch", "variant", "cache", "repeats", "new_tokens", "prefill_s", "decode_ms", "decode_vs_base",
           "tokens_per_s", "step_ops", "ops_beside_graph", "step_syncs", "warmup_s", "decode_path")


def generate(engine, ids: torch.Tensor, new_tokens: int, cache: str, mask: torch.Tensor | None = None) -> float:
    """Seconds of one greedy generate of exactly `new_tokens` tokens (no early stop), the device synchronised;
    `mask`: a batch's padding (none: none)."""
    model = engine.model
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=model.generation_config.pad_token_id or 0)
    if cache == "static":
        options["cache_implementation"] = "static"
    engine.sync()
    began = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, **options)
    engine.sync()
    return time.perf_counter() - began


def per_step(engine, ids: torch.Tensor, cache: str, mask=None, short: int = 2, long: int = 6) -> tuple[float, float]:
    """Aten ops and reads back from the device per decode step: the difference of two generates, over the steps
    between them (the prefill and generate's setup cancel out)."""
    counts = []
    for new_tokens in (short, long):
        with OpCounter() as counter:
            generate(engine, ids, new_tokens, cache, mask)
        counts.append(counter)
    steps = long - short
    return (counts[1].total - counts[0].total) / steps, (counts[1].syncs - counts[0].syncs) / steps


def patched(model, settings):
    return contextlib.nullcontext() if settings is None else merging(model, settings)


def prompts(engine, length: int, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random prompts [batch, length] and their mask: row r is 16·r tokens shorter, padded on the left, as a
    tokenizer pads a batch for generation (None for one prompt)."""
    ids = torch.randint(3, engine.config.vocab_size, (batch, length), generator=generator)
    if batch == 1:
        return ids.to(engine.device), None
    pads = torch.tensor([min(16 * row, length - 1) for row in range(batch)])
    mask = (torch.arange(length)[None] >= pads[:, None]).long()
    return (ids * mask).to(engine.device), mask.to(engine.device)


def run_patch(engine, lengths, variants, caches, repeats: int, new_tokens: int, seed: int = 0, log=print,
              plain_caches=None, batches=(1,)) -> list[dict]:
    """One row per length, batch, variant and cache; `variants` is [(name, settings or None for the plain model)],
    the plain model timed with `plain_caches` (default `caches`)."""
    rows = []
    for length in lengths:
        for batch in batches:
            generator = torch.Generator().manual_seed(seed + length)
            ids, mask = prompts(engine, length, batch, generator)
            rows += _run_prompts(engine, ids, mask, variants, caches, repeats, new_tokens, log, plain_caches)
    return rows


def _run_prompts(engine, ids, mask, variants, caches, repeats, new_tokens, log, plain_caches) -> list[dict]:
    """run_patch's rows for one batch of prompts [batch, length] (mask: its padding, or None)."""
    model, rows = engine.model, []
    batch, length = ids.shape
    runs: dict[tuple, dict[str, list]] = {}
    for block in (variants, variants[::-1]):  # in order, then in reverse
        for name, settings in block:
            with patched(model, settings):
                forward = model.model.__dict__.get("forward")
                for cache in (caches if settings is not None or plain_caches is None else plain_caches):
                    began = time.perf_counter()
                    generate(engine, ids, new_tokens, cache, mask)  # compiles and records; never timed
                    cell = runs.setdefault((name, cache), {"prefill": [], "total": [], "warmup": []})
                    cell["warmup"].append(time.perf_counter() - began)
                    for _ in range(repeats):
                        cell["prefill"].append(generate(engine, ids, 1, cache, mask))
                        cell["total"].append(generate(engine, ids, new_tokens, cache, mask))
                    if "ops" not in cell:
                        cell["ops"], cell["syncs"] = per_step(engine, ids, cache, mask)
                        cell["path"] = ("generate's own" if settings is None else
                                        forward.decode_path if cache == "static" else "dynamic")
                        graphed = cell["path"] in ("static", "graph", "compiled")
                        # the static step counted on the first row, unpadded: a batch's dispatches the same ops
                        cell["beside"] = cell["ops"] - (profile_decode_step(
                            engine, ids[:1], settings, "static", head=False)["decode_ops"] if graphed else 0)
                    log(f"patch: {length} tokens, batch {batch}, {name}, {cache} cache: {len(cell['total'])} runs")
    for (name, cache), cell in runs.items():
        prefill, total = statistics.median(cell["prefill"]), statistics.median(cell["total"])
        decode_ms = 1000 * (total - prefill) / (new_tokens - 1)
        rows.append({"length": length, "batch": batch, "variant": name, "cache": cache,
                     "repeats": len(cell["total"]), "new_tokens": new_tokens, "prefill_s": prefill,
                     "decode_ms": decode_ms, "tokens_per_s": 1000 * batch / decode_ms, "step_ops": cell["ops"],
                     "ops_beside_graph": cell["beside"], "step_syncs": cell["syncs"],
                     "warmup_s": max(cell["warmup"]), "decode_path": cell["path"]})
    base = {row["cache"]: row["decode_ms"] for row in rows if row["variant"] == BASE}
    for row in rows:
        if base.get(row["cache"]):
            row["decode_vs_base"] = base[row["cache"]] / row["decode_ms"]
    return rows


def parser(add_parser=None) -> argparse.ArgumentParser:
    p = subcommand("patch", __doc__.split("\n\n")[1], [
        model_options("random weights of a known shape: mistral-7b (with --device cuda) times real sizes; tiny is "
                      "for tests", "the random prompts (and, for --shape, the random weights)"),
        run_options("one short length, two repeats: a minute on a CPU", "folder for the CSV and JSON files",
                    threads_default="torch's choice; 1 with --quick on a CPU"),
    ], add_parser, summary="generate itself, plain and under slerpviz.merging, with a dynamic and a static cache")
    p.add_argument("--lengths", type=listed, help="prompt lengths, comma-separated (default 512,1024; quick 256)")
    p.add_argument("--preset", type=listed, default="recommended",
                   help="presets timed under the patch beside the plain model, comma-separated (default recommended)")
    p.add_argument("--caches", type=listed, default=",".join(CACHES),
                   help="generate's cache: dynamic, static or both (default both)")
    p.add_argument("--plain-caches", type=listed,
                   help="the plain model's caches, when not --caches: on a GPU generate compiles a plain static "
                        "cache's step (a minute or two), so `dynamic` leaves it out")
    p.add_argument("--repeats", type=whole(1), help="timed generates per cell and block (default 3; quick 1)")
    p.add_argument("--new-tokens", type=whole(2), help="tokens a timed generate makes (default 16; quick 6)")
    p.add_argument("--batches", type=listed, default="1",
                   help="prompts generated together, comma-separated (default 1); a batch of several is padded on "
                        "the left (row r 16·r tokens shorter)")
    return p


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """`python -m slerpviz.bench patch` with `argv` (the words after `patch`); `args`: already parsed."""
    args = args if args is not None else parser().parse_args(argv)
    return guarded(args, lambda: _main(argv, args))


def _main(argv, args) -> int:
    lengths = int_list(args.lengths) if args.lengths is not None else (256,) if args.quick else (512, 1024)
    names = str_list(args.preset, tuple(PRESETS), "preset")
    caches = str_list(args.caches, CACHES, "cache")
    plain_caches = str_list(args.plain_caches, CACHES, "cache") if args.plain_caches is not None else caches
    engine, name = build_engine(args)
    variants = [(BASE, None), *((n, preset(n, engine.num_layers)) for n in names)]
    repeats = args.repeats or (1 if args.quick else 3)
    new_tokens = args.new_tokens or (6 if args.quick else 16)
    began = time.perf_counter()
    batches = int_list(args.batches, "batch")
    rows = run_patch(engine, lengths, variants, caches, repeats, new_tokens, args.seed,
                     log=lambda m: print(m, file=sys.stderr), plain_caches=plain_caches, batches=batches)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(engine.device, ["patch", *(argv or [])])
    report.write_csv(out / "patch.csv", rows, COLUMNS)
    report.write_json(out / "patch.json", {"benchmark": "patch", "machine": machine,
                                           "model": describe_model(engine, name), "rows": rows,
                                           "plan": {"lengths": lengths, "presets": names, "caches": caches,
                                                    "plain_caches": plain_caches, "batches": batches,
                                                    "repeats": repeats, "new_tokens": new_tokens}})
    print(f"patch on {machine['gpu'] or machine['cpu']} ({machine['device']}, torch {machine['torch']}), model "
          f"{name}, {time.perf_counter() - began:.0f} s; n = repeats per cell (two blocks), medians")
    print(report.format_table(rows, [
        ("length", "tokens", ""), ("batch", "batch", ""), ("variant", "variant", ""), ("cache", "cache", ""),
        ("repeats", "n", ""), ("prefill_s", "prefill s", ".3f"), ("decode_ms", "ms/step", ".1f"),
        ("decode_vs_base", "x base", ".2f"), ("tokens_per_s", "tokens/s", ".1f"), ("step_ops", "ops/step", ".0f"),
        ("ops_beside_graph", "beside graph", ".0f"), ("step_syncs", "syncs/step", ".1f"),
        ("warmup_s", "warm-up s", ".1f"), ("decode_path", "decode", "")]))
    print(f"\nwrote {out / 'patch.csv'}, patch.json")
    return 0
