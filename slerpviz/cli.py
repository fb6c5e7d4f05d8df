"""`python -m slerpviz generate ...`: base and merged on the same prompt, side by side in the terminal."""

from __future__ import annotations

import argparse
import json
import sys

from . import inputs
from .engine import MODES, MergeSettings, Sampling, Trace, check_sampling, interleave
from .merge import CHOICES, METHODS, POSITION_MODES, ratio_per_stage
from .models import ALLOWED_MODELS, EMBEDDED, check_allowed, load


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m slerpviz", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="run base and merged on one prompt")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--model", default=EMBEDDED, help=f"one of: {', '.join(ALLOWED_MODELS)}")
    gen.add_argument("--cutoff", type=int, action="append", default=None,
                     help="decoder layer where tokens merge; repeat for a multi-stage schedule (default: half depth)")
    gen.add_argument("--keep-start", type=int, default=0, help="tokens at the start never merged")
    gen.add_argument("--keep-end", type=int, default=0, help="tokens at the end never merged")
    gen.add_argument("--method", default="slerp", help=f"one of: {', '.join(METHODS)}")
    gen.add_argument("--positions", default="mean", help=f"one of: {', '.join(POSITION_MODES)}")
    gen.add_argument("--ratio", type=float, action="append", default=None,
                     help="share of eligible pairs merged at each cutoff (one for all, or one per --cutoff)")
    gen.add_argument("--choice", default="consecutive", help=f"which pairs: {', '.join(CHOICES)}")
    gen.add_argument("--proportional", action="store_true",
                     help="proportional attention: add log(tokens held) to a merged key's attention logit")
    gen.add_argument("--mode", default="cached", help=f"one of: {', '.join(MODES)}")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, without the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def summary(trace: Trace) -> dict:
    decode = trace.decode_s
    return {
        "text": trace.text,
        "tokens_generated": len(trace.generated_ids),
        "time_to_first_token_s": trace.prefill_s,
        "decode_ms_per_token": 1000 * sum(decode) / len(decode) if decode else None,
        "kv_cache_bytes": sum(trace.kv_bytes_per_layer),
        "seq_len_per_layer": trace.seq_len_per_layer,
    }


def check_arguments(args) -> Sampling:
    """Everything that can be checked without the model, checked before it loads (seconds saved on every typo), by
    the same rules as the app: a negative seed or an infinite temperature is refused here as it is there."""
    check_allowed(args.model)
    inputs.text(args.prompt, "prompt")
    for cutoff in args.cutoff or ():
        inputs.whole(cutoff, "cutoff", 0)
    inputs.whole(args.keep_start, "keep start", 0)
    inputs.whole(args.keep_end, "keep end", 0)
    inputs.one_of(args.method, "merge method", METHODS)
    inputs.one_of(args.positions, "positions mode", POSITION_MODES)
    inputs.one_of(args.choice, "pair choice", CHOICES)
    inputs.one_of(args.mode, "mode", MODES)
    if args.ratio is not None:
        ratio_per_stage(merge_ratio(args), len(args.cutoff) if args.cutoff else 1)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    check_sampling(sampling)
    return sampling


def merge_ratio(args) -> float | tuple[float, ...]:
    return 1.0 if args.ratio is None else args.ratio[0] if len(args.ratio) == 1 else tuple(args.ratio)


def generate(args) -> dict:
    sampling = check_arguments(args)
    try:
        engine = load(args.model, progress=lambda message: print(message, file=sys.stderr))
    except (OSError, RuntimeError) as error:  # a hub model out of reach, a missing package: one line, like bad input
        raise ValueError(f"could not load {args.model}: {inputs.one_line(error)}") from None
    cutoffs = tuple(args.cutoff) if args.cutoff is not None else (engine.num_layers // 2,)
    merged_settings = MergeSettings(cutoffs, args.keep_start, args.keep_end, args.method, args.positions,
                                    merge_ratio(args), args.choice, args.proportional)
    ids = engine.encode(args.prompt, chat=not args.no_chat)
    # Both runs are created (and so validated) before either generates: bad input changes nothing.
    base = engine.start(ids, MergeSettings(), sampling, args.mode)
    merged = engine.start(ids, merged_settings, sampling, args.mode)
    engine.warm_up()
    for _ in interleave(base, merged):  # step by step, each run timed on its own
        pass
    return {
        "base": summary(base.trace),
        "merged": summary(merged.trace),
        "plan": {
            "tokens": merged.trace.tokens,
            "cutoffs": merged.trace.cutoffs,
            "groups": merged.trace.groups,
            "protected": merged.trace.protected,
            "pair_cosines": merged.trace.pair_cosines,
            "slot_sizes": merged.trace.slot_sizes,
            "settings": merged.trace.settings,
        },
        "seq_len_per_layer": {"base": base.trace.seq_len_per_layer, "merged": merged.trace.seq_len_per_layer},
    }


def print_text(result: dict) -> None:
    for name in ("base", "merged"):
        side = result[name]
        per_token = side["decode_ms_per_token"]
        print(f"== {name} ==")
        print(side["text"])
        print(
            f"-- {side['tokens_generated']} tokens, first token after {side['time_to_first_token_s'] * 1000:.1f} ms, "
            + (f"{per_token:.1f} ms per further token, " if per_token is not None else "")
            + f"KV cache {side['kv_cache_bytes'] / 1024:.0f} KiB\n"
        )
    print("sequence length per layer")
    print("  base:  ", " ".join(map(str, result["seq_len_per_layer"]["base"])))
    print("  merged:", " ".join(map(str, result["seq_len_per_layer"]["merged"])))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = generate(args)
    except ValueError as error:  # bad input: say what is wrong, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print_text(result)
    return 0
