"""python -m slerpviz.bench groups [--quick] [--model NAME | --shape ...] [--texts FILE] [--layers ...] [--sizes ...]

SLERP for k vectors: what a group of k neighbouring tokens becomes when a layer merges log2(k) times (a cutoff
listed k/2 times), made exactly as the engine makes it (slerpviz.pairs plans, slerpviz.merge interpolates, each round
at t = tokens on the right / tokens in both), against the normalised mean with the norm restored (the mean of the
tokens' unit vectors, scaled to the mean of their norms), on the model's own hidden states at each layer. Writes
DIR/groups.csv (one row per text, layer, size and method), groups.json (machine, command, commit) and prints a table
with n beside every figure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..merge import apply_plan, cosine
from ..pairs import plan_stages
from . import report
from .machine import machine_info
from .options import (build_engine, describe_model, guarded, int_list, listed, model_options, run_options,
                      subcommand, text_options, whole)
from .texts import TokenText, random_texts, read_texts, tokenize

METHODS_MEASURED = ("slerp", "slerp-dir", "lerp")
GROUP_COLUMNS = ("text", "layer", "size", "method", "groups", "cos_mean", "cos_min", "norm_ratio_mean")


def normalised_mean(vectors: torch.Tensor) -> torch.Tensor:
    """[groups, k, d] -> [groups, d]: the direction of the mean of the unit vectors, at the mean of the norms."""
    norms = vectors.float().norm(dim=-1, keepdim=True)
    direction = (vectors.float() / norms.clamp_min(1e-12)).mean(1)
    return direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12) * norms.mean(1)


def iterated(hidden: torch.Tensor, size: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [1, L, d] merged `size` tokens a slot as the engine does it (log2(size) rounds at one layer, every pair
    of the middle): the slots holding `size` tokens [groups, d] and those tokens [groups, size, d]."""
    rounds = size.bit_length() - 1
    stages = plan_stages(hidden.shape[1], (0,) * rounds)
    merged = hidden
    for stage in stages:
        merged = apply_plan(merged, stage.plan, method)
    whole = torch.nonzero(stages[-1].sizes == size).flatten()
    members = stages[-1].first[whole, None] + torch.arange(size)
    return merged[0, whole].float(), hidden[0, members].float()


def measure(hidden: torch.Tensor, size: int, method: str) -> dict:
    merged, members = iterated(hidden, size, method)
    reference = normalised_mean(members)
    cos = cosine(merged, reference)
    ratio = merged.norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-12)
    return {"groups": int(cos.numel()), "cos_mean": cos.mean().item(), "cos_min": cos.min().item(),
            "norm_ratio_mean": ratio.mean().item()}


def run_groups(engine, texts, layers: tuple[int, ...], sizes: tuple[int, ...], log=print) -> list[dict]:
    rows = []
    for text in texts:
        log(f"groups: {text.name}, {text.ids.shape[-1]} tokens")
        with torch.inference_mode():
            hidden = engine.model(text.ids.to(engine.device), output_hidden_states=True,
                                  use_cache=False).hidden_states
        for layer in layers:  # hidden[c] is what enters layer c: where a cutoff at c merges
            states = hidden[layer].cpu()  # once a layer, beside the plans (made on the CPU), for every size and method
            for size in sizes:
                for method in METHODS_MEASURED:
                    rows.append({"text": text.name, "layer": layer, "size": size, "method": method,
                                 **measure(states, size, method)})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per layer, size and method over the texts, n counting groups: means weighted by groups, the worst minimum."""
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault((row["layer"], row["size"], row["method"]), []).append(row)
    summary = []
    for (layer, size, method), members in cells.items():
        n = sum(r["groups"] for r in members)
        weighted = lambda key: sum(r[key] * r["groups"] for r in members) / n  # noqa: E731
        summary.append({"layer": layer, "size": size, "method": method, "n": n, "cos_mean": weighted("cos_mean"),
                        "cos_min": min(r["cos_min"] for r in members),
                        "norm_ratio_mean": weighted("norm_ratio_mean")})
    return summary


def parser(add_parser=None) -> argparse.ArgumentParser:
    p = subcommand("groups", __doc__.split("\n\n")[1], [
        model_options("random weights (tiny: for tests; the figures mean nothing)", "for --shape: the random texts"),
        run_options("two texts, one layer: a few seconds"),
        text_options(),
    ], add_parser, summary="SLERP for k vectors: iterated pairs against the normalised mean with the norm restored")
    p.add_argument("--layers", type=listed, help="layers whose input is merged, comma-separated (default 0.4 and 0.5 "
                                                 "of the depth)")
    p.add_argument("--sizes", type=listed, help="tokens a group holds, powers of two (default 2,4,8)")
    p.add_argument("--tokens", type=whole(16), default=513, help="tokens read from each text (default 513)")
    return p


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """`python -m slerpviz.bench groups` with `argv` (the words after `groups`); `args`: already parsed."""
    args = args if args is not None else parser().parse_args(argv)
    return guarded(args, lambda: _main(argv, args))


def _main(argv, args) -> int:
    engine, name = build_engine(args)
    depth = engine.num_layers
    layers = (int_list(args.layers, "layer", low=0) if args.layers is not None
              else (round(0.4 * depth),) if args.quick else (round(0.4 * depth), round(0.5 * depth)))
    sizes = int_list(args.sizes, "group size", low=2) if args.sizes is not None else (2, 4, 8)
    if any(size & (size - 1) for size in sizes):
        raise ValueError(f"group sizes are powers of two (rounds of pairs at one layer), got {sizes}")
    if any(layer > depth for layer in layers):
        raise ValueError(f"layers are 0 to {depth} on this model, got {layers}")
    if args.shape:
        texts = random_texts(engine.config.vocab_size, 2, args.tokens, args.seed)
    else:
        texts = tokenize(engine.tokenizer, read_texts(args.texts))[:2 if args.quick else None]
    texts = [TokenText(t.name, t.ids[:, :args.tokens]) for t in texts]
    began = time.perf_counter()
    rows = run_groups(engine, texts, layers, sizes, log=lambda m: print(m, file=sys.stderr))
    summary = summarise(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(engine.device, ["groups", *(argv or [])])
    report.write_csv(out / "groups.csv", rows, GROUP_COLUMNS)
    report.write_json(out / "groups.json", {"benchmark": "groups", "machine": machine,
                                            "model": describe_model(engine, name),
                                            "plan": {"layers": layers, "sizes": sizes, "tokens": args.tokens,
                                                     "texts": [t.name for t in texts]},
                                            "summary": summary, "rows": rows})
    print(f"groups on {machine['gpu'] or machine['cpu']} ({machine['device']}), model {name}, "
          f"{time.perf_counter() - began:.0f} s; each group against the normalised mean with the norm restored")
    print(report.format_table(summary, [("layer", "layer", ""), ("size", "tokens", ""), ("method", "method", ""),
                                        ("n", "n groups", ""), ("cos_mean", "cosine", ".5f"),
                                        ("cos_min", "worst", ".5f"), ("norm_ratio_mean", "norm ratio", ".3f")]))
    print(f"\nwrote {out / 'groups.csv'}, groups.json")
    return 0
