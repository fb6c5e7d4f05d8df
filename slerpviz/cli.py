"""`python -m slerpviz generate ...`: base and merged on the same prompt, side by side in the terminal."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys

from . import settings as checks
from .engine import MODES, MergeSettings, Sampling, Trace, check_sampling, interleave
from .merge import CHOICES, METHODS, POSITION_MODES
from .settings import Parser
from .models import ALLOWED_MODELS, EMBEDDED, check_allowed, load_for_command_line
from .presets import PRESETS, preset

DEFAULTS = MergeSettings()
# The flags that set one merge setting each; given with --preset, each overrides the preset's value.
MERGE_FLAGS = ("cutoff", "keep_start", "keep_end", "keep_recent", "method", "positions", "ratio", "choice",
               "proportional", "attention_window", "attention_keep", "attention_reach", "attention_keep_share")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m slerpviz", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser(
        "generate", help="run base and merged on one prompt",
        description="Run the base model and the merged one on one prompt, step by step, each timed on its own. "
                    "Merge settings come from the flags below, or from --preset; a merge flag given with --preset "
                    "overrides that one setting of the preset.")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--model", default=EMBEDDED, help=f"one of: {', '.join(ALLOWED_MODELS)}")
    # argparse expands % in help text: a description saying "27 %" must reach it as "27 %%".
    presets_help = "; ".join(f"{name}: {p.description}" for name, p in PRESETS.items()).replace("%", "%%")
    gen.add_argument("--preset", metavar="NAME",
                     help=f"named merge settings from slerpviz.presets ({presets_help}). The preset supplies every "
                          "merge setting (cutoffs as shares of the model's depth); a merge flag given with it "
                          "(--cutoff, --ratio, --choice, --keep-start, --attention-window, ...) overrides that one "
                          "setting")
    gen.add_argument("--cutoff", type=int, action="append", default=None,
                     help="decoder layer where tokens merge; repeat for a multi-stage schedule, the same layer "
                          "again to merge twice there: groups of up to four tokens (default: half depth)")
    gen.add_argument("--keep-start", type=int, default=None, help="tokens at the start never merged (default 0)")
    gen.add_argument("--keep-end", type=int, default=None, help="tokens at the end never merged (default 0)")
    gen.add_argument("--keep-recent", type=int, default=None,
                     help="the last tokens never merged, all of a shorter prompt (default 0; the presets keep 32)")
    gen.add_argument("--method", default=None, help=f"one of: {', '.join(METHODS)} (default {DEFAULTS.method})")
    gen.add_argument("--positions", default=None,
                     help=f"one of: {', '.join(POSITION_MODES)} (default {DEFAULTS.positions})")
    gen.add_argument("--ratio", action="append", default=None, metavar="R",
                     help="share of eligible pairs merged: one for every cutoff, or one per cutoff in the order of "
                          f"the --cutoff flags, comma-separated as on the page and in the benchmarks (--ratio "
                          f"{checks.RATIO_EXAMPLE}); repeated --ratio flags join into that list (default 1)")
    gen.add_argument("--choice", default=None,
                     help=f"which pairs: {', '.join(CHOICES)} (default {DEFAULTS.choice}); attention merges the "
                          "pairs the last prompt tokens attend to least at the cutoff layer")
    gen.add_argument("--attention-window", type=int, default=None, metavar="W",
                     help="with --choice attention: score each token by the attention the last W prompt tokens pay "
                          f"it at the cutoff layer (a whole number, 1 or more; default {DEFAULTS.attention_window})")
    gen.add_argument("--attention-keep", type=int, default=None, metavar="K",
                     help="with --choice attention: the K most-attended tokens never merge (0 or more; default "
                          f"{DEFAULTS.attention_keep})")
    gen.add_argument("--attention-keep-share", type=float, default=None, metavar="S",
                     help="with --choice attention: on a long prompt the kept budget grows to this share of its "
                          f"tokens (0 to 1; default {DEFAULTS.attention_keep_share:g}: the budget stays K)")
    gen.add_argument("--attention-reach", type=int, default=None, metavar="R",
                     help="with --choice attention: a pair ranks with the most attended token within R tokens "
                          f"either side (0 to {checks.MAX_ATTENTION_REACH}; default {DEFAULTS.attention_reach})")
    gen.add_argument("--proportional", action="store_true", default=None,
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
    the same rules as the app: a negative seed or an infinite temperature is refused here as it is there, and the
    merge flags go through the library's one parser of merge settings, as the page's fields do."""
    check_allowed(args.model)
    checks.text(args.prompt, "prompt")
    if args.preset is not None:
        checks.one_of(args.preset, "preset", tuple(PRESETS))
    chosen = PRESETS[args.preset] if args.preset is not None else None
    if chosen is not None and args.cutoff and args.ratio is None:
        check_preset_ratio(args.preset, len(args.cutoff))
    # The cutoffs of a preset, or half the depth, wait for the model; until then only their count is known.
    template = checks.merge_settings(**raw_fields(args, chosen.merge if chosen is not None else DEFAULTS,
                                                  args.cutoff))
    if not args.cutoff:
        checks.ratio_count(template.ratio, len(chosen.depth_shares) if chosen is not None else 1)
    checks.one_of(args.mode, "mode", MODES)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    check_sampling(sampling)
    return sampling


def check_preset_ratio(name: str, stages: int) -> None:
    ratio = PRESETS[name].merge.ratio
    if isinstance(ratio, tuple) and len(ratio) != stages:
        raise ValueError(f"preset {name} gives one merge ratio per cutoff ({', '.join(f'{r:g}' for r in ratio)}), "
                         f"and --cutoff gives {stages} cutoffs: give --ratio too")


def raw_fields(args, base: MergeSettings, cutoffs) -> dict:
    """The raw values of the merged side's settings: `base`'s, with every merge flag given in place of its setting
    (repeated --ratio flags joined into the one syntax of per-cutoff ratios, "0.5, 1"), and `cutoffs` (None: not
    known yet)."""
    fields = dataclasses.asdict(base)
    fields.update({flag: getattr(args, flag) for flag in MERGE_FLAGS
                   if flag not in ("cutoff", "ratio") and getattr(args, flag) is not None})
    if args.ratio is not None:
        fields["ratio"] = ", ".join(args.ratio)
    fields["cutoffs"] = None if cutoffs is None else list(cutoffs)
    return fields


def merge_settings(args, num_layers: int) -> MergeSettings:
    """The merged side's settings: the preset's (or the defaults, with one cutoff at half the depth), with every merge
    flag given on the command line in place of its setting, through the library's parser (settings.merge_settings)."""
    base = preset(args.preset, num_layers) if args.preset is not None else MergeSettings(cutoffs=(num_layers // 2,))
    cutoffs = base.cutoffs
    if args.cutoff is not None:
        # Ratios given with the cutoffs pair with them in the order given; a preset's ratios are in layer order, so
        # its ratios meet the cutoffs in layer order too, whatever order the flags came in.
        cutoffs = args.cutoff if args.ratio is not None else sorted(args.cutoff)
    return checks.merge_settings(**raw_fields(args, base, cutoffs))


def generate(args) -> dict:
    sampling = check_arguments(args)
    engine = load_for_command_line(args.model, progress=lambda message: print(message, file=sys.stderr))
    merged_settings = merge_settings(args, engine.num_layers)
    ids = engine.encode(args.prompt, chat=not args.no_chat)
    # Both runs are created (and so validated) before either generates: bad input changes nothing.
    base = engine.start(ids, MergeSettings(), sampling, args.mode)
    merged = engine.start(ids, merged_settings, sampling, args.mode)
    engine.warm_up()
    for _ in interleave(base, merged, order=random.Random()):  # step by step, each run timed on its own, by turns
        pass
    return {
        "preset": args.preset,
        "base": summary(base.trace),
        "merged": summary(merged.trace),
        "plan": {
            "tokens": merged.trace.tokens,
            "cutoffs": merged.trace.cutoffs,
            "groups": merged.trace.slot_tokens,
            "protected": merged.trace.protected,
            "pair_cosines": merged.trace.pair_cosines,
            "attention_scores": merged.trace.attention_scores,
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
        if name == "merged":
            preset_name = f"preset {result['preset']}: " if result.get("preset") else ""
            print(f"({preset_name}{checks.describe(result['plan']['settings'])})")
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
