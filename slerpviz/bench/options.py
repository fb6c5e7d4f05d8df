"""What the benchmark subcommands share: their common options, declared once, and the helpers that read them.

The options come as argparse parent parsers, one per concern:

- `model_options`: which model and where it runs (--model | --shape, --device, --dtype, --seed);
- `run_options`: how big a run and where it writes (--quick, --out, --threads);
- `text_options`: the texts read (--texts);
- `merge_options`: one merge setting (--cutoffs, --ratio, --choice, --keep-start, --keep-end, --keep-recent and,
  where the subcommand uses them, --attention-window, --attention-keep, --cosine-share), read back by
  `merge_settings` through the library's parser of merge settings (slerpviz.settings.merge_settings, the page's and
  the CLI's too);
- `interpolation_options`: how the slots are made (--method, --positions), where it is one setting, not a grid;
- `speed_fidelity_parents`: what speed and fidelity share, --proportional included.

`subcommand` builds a subcommand's parser from the parents it needs, as a sub-parser of `python -m slerpviz.bench`
or on its own (each benchmark's `main` also takes its own argv); the subcommand then adds only its own options. The
helpers below (lists from the command line, the engine, the model's description, `guarded`) serve every subcommand,
so the benchmark modules import this module and never each other's commands.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch

from .. import settings as checks
from ..settings import MergeSettings, Parser
from ..settings import describe as settings_label  # a merge setting in words; the label of a variant
from ..merge import CHOICES, METHODS, POSITION_MODES
from ..models import EMBEDDED
from .engines import SHAPES, named_engine, random_weight_engine
from .limits import Shape

PROG = "python -m slerpviz.bench"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHOICES_HELP = f"which pairs merge: {', '.join(CHOICES)}"
# What a benchmark writes: the description of `python -m slerpviz.bench` and of its speed and fidelity subcommands.
DESCRIPTION = ("Writes DIR/<benchmark>.csv, .json and .html and prints a short table. `--quick` is a smoke run sized "
               "to finish in\nunder three minutes on a 2-core CPU with the embedded model; without it the grid is "
               "docs/measurements.md's.\n`python -m slerpviz.bench snapshot REPORT.html PICTURE.png` draws a report "
               "as a picture.")
PROPORTIONAL = {"off": (False,), "on": (True,), "both": (False, True)}  # --proportional: the settings it stands for


# ----------------------------------------------------------------------------------------------------------------
# The parent parsers
# ----------------------------------------------------------------------------------------------------------------


def _argument(parse):
    """An argparse type from a slerpviz.settings check: its message, without the field name argparse already gives."""
    def argument(text: str):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix("it ")) from None

    return argument


@functools.cache  # one function per rule, so subcommands sharing an option share its type
def whole(low: int, high: int | None = None):
    """An argparse type: a whole number in [low, high], by the same rule and words as the app and the CLI."""
    return _argument(lambda text: checks.whole(text, "it", low, high))


share = _argument(lambda text: checks.real(text, "it", 0, 1))  # an argparse type: a number from 0 to 1


def listed(text: str) -> str:
    """An argparse type for a comma-separated list (--lengths 512,1024), kept as the text its reader parses: at least
    one item. An empty list ("" or ",") was once read as "not given", and ran the default, full benchmark."""
    if not split(text):
        raise argparse.ArgumentTypeError(f"an empty list ({text!r}): give at least one value, comma-separated, or "
                                         "leave the option out for its default")
    return text


def given(text: str) -> str:
    """An argparse type for a name (--model, --device): not empty. An empty --model was once the default model."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty value: give one, or leave the option out for its default")
    return text


def path(text: str) -> Path:
    """An argparse type for a file or folder: not empty. Path("") is the current folder, so an empty --texts once read
    every .txt there and an empty --out wrote there."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: give a file or folder, or leave the option out for its "
                                         "default")
    return Path(text)


# An argparse type: one merge ratio for every cutoff (0.5), or one per cutoff of each schedule, in layer order,
# comma-separated (0.5,1), by the library's one reading of ratios (slerpviz.settings.merge_ratio), as the page's and
# the CLI's; the old "0.5/1" is refused with a line naming the commas.
ratios = _argument(checks.merge_ratio)


def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


def model_options(shape_help: str, seed_help: str | None = None) -> argparse.ArgumentParser:
    """--model | --shape, --device, --dtype, --seed; `shape_help` says what random weights are good for here."""
    p = _parent()
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", type=given,
                       help="an allow-listed model name (default: the embedded SmolLM2-135M-Instruct)")
    which.add_argument("--shape", choices=SHAPES, help=shape_help)
    p.add_argument("--device", type=given, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, help="for --shape: default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--seed", type=whole(0, checks.SEED_LIMIT - 1), default=0, help=seed_help)
    return p


def run_options(quick_help: str, out_help: str = "folder for the CSV, JSON and HTML files",
                threads_default: str = "torch's choice") -> argparse.ArgumentParser:
    """--quick, --out (default bench-out), --threads."""
    p = _parent()
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", type=path, default=Path("bench-out"), help=out_help)
    p.add_argument("--threads", type=whole(1),
                   help=f"CPU threads for torch (default: {threads_default}). On a CPU shared with other jobs 1 is "
                        "faster and far steadier: threads waiting on a busy core stall each other")
    return p


def text_options(what: str = "") -> argparse.ArgumentParser:
    """--texts, repeatable; `what` says what the texts are for here ("filler: ")."""
    p = _parent()
    p.add_argument("--texts", type=path, action="append",
                   help=f"{what}a text file (texts separated by '---' lines) or a folder of .txt; repeatable "
                        "(default: assets/texts)")
    return p


def merge_options(cutoffs_help: str, choice_help: str = CHOICES_HELP,
                  attention: bool = True) -> argparse.ArgumentParser:
    """The flags of one merge setting (read back by `merge_fields`); `attention` adds the attention choice's
    window and budget."""
    p = _parent()
    p.add_argument("--cutoffs", type=listed, help=cutoffs_help)
    p.add_argument("--ratio", type=ratios, default=1.0,
                   help="share of eligible pairs merged: one for every cutoff, or one per cutoff of each schedule, "
                        f"in layer order, comma-separated as on the page and the command line: --cutoffs 15+20 "
                        f"--ratio {checks.RATIO_EXAMPLE}. A list is one setting, not a grid of ratios: each schedule "
                        "then needs one cutoff per ratio")
    p.add_argument("--choice", type=listed, default="consecutive", help=choice_help)
    p.add_argument("--keep-start", type=whole(0), default=0, help="protected tokens at the start")
    p.add_argument("--keep-end", type=whole(0), default=0, help="protected tokens at the end")
    p.add_argument("--keep-recent", type=whole(0), default=0,
                   help="the last tokens never merged, all of a shorter prompt (the presets keep 32)")
    if attention:
        attention_window_option(p)
        p.add_argument("--attention-keep", type=whole(0), default=MergeSettings.attention_keep,
                       help="attention choice: the most-attended tokens that never merge "
                            f"(default {MergeSettings.attention_keep})")
        p.add_argument("--attention-keep-share", type=share, default=MergeSettings.attention_keep_share,
                       help="attention choice: on a long prompt the kept budget grows to this share of its tokens "
                            f"(default {MergeSettings.attention_keep_share:g}: the budget stays --attention-keep)")
        p.add_argument("--attention-reach", type=whole(0, checks.MAX_ATTENTION_REACH),
                       default=MergeSettings.attention_reach,
                       help="attention choice: a pair ranks with the most attended token within this many tokens "
                            f"either side (default {MergeSettings.attention_reach})")
        p.add_argument("--cosine-share", type=share, default=0.0,
                       help="attention choice: the share of the pair ranking given to how unlike the pair is "
                            "(1 - cosine), from 0 (attention only, the default) to 1")
    return p


def attention_window_option(p: argparse.ArgumentParser) -> None:
    """--attention-window, for merge_options and for `locate`, which scores as the attention choice does."""
    p.add_argument("--attention-window", type=whole(1), default=MergeSettings.attention_window,
                   help="attention choice: the last W prompt tokens whose attention scores the others "
                        f"(default {MergeSettings.attention_window})")


def interpolation_options(what: str) -> argparse.ArgumentParser:
    """--method and --positions: how the slots are made, for `what` ("every setting", "the variants timed")."""
    p = _parent()
    p.add_argument("--method", default="slerp", choices=METHODS, help=f"interpolation used for {what}")
    p.add_argument("--positions", "--position-mode", dest="positions", default="mean", choices=POSITION_MODES,
                   help=f"positions mode used for {what}")
    return p


def speed_fidelity_parents(fidelity: bool) -> list[argparse.ArgumentParser]:
    """What speed and fidelity share: the model, the run, one merge setting and proportional attention."""
    proportional = _parent()
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
        merge_options("schedules, comma-separated; 7+15 is a two-stage schedule, 15+15 merges twice at 15 (groups of "
                      "four) (default: by model)",
                      CHOICES_HELP + ("; a comma-separated list for a grid (attention with W 32, no budget)"
                                      if fidelity else ""),
                      attention=not fidelity),  # fidelity's grid has no attention window or budget
        proportional,
    ]


def subcommand(name: str, description: str, parents: list[argparse.ArgumentParser], add_parser=None,
               summary: str | None = None) -> argparse.ArgumentParser:
    """The parser of `python -m slerpviz.bench NAME` built on `parents`: with `add_parser` (a subparsers action's
    add_parser) one of the main parser's subcommands, else a parser of its own. Either way a bad flag or value is
    one line on stderr and status 2."""
    settings = dict(description=description, parents=parents, formatter_class=argparse.RawDescriptionHelpFormatter)
    if add_parser is None:
        return Parser(prog=f"{PROG} {name}", **settings)
    return add_parser(name, help=summary or description, **settings)


# ----------------------------------------------------------------------------------------------------------------
# Reading the options
# ----------------------------------------------------------------------------------------------------------------


def split(text: str) -> list[str]:
    """"512, 1024," -> ["512", "1024"]: the items of a comma-separated list, spaces and empty items dropped."""
    return [item for item in text.replace(" ", "").split(",") if item]


def items(text: str, what: str, example: str) -> list[str]:
    """The items of a list option; none at all is refused (never read as "the default")."""
    found = split(text)
    if not found:
        raise ValueError(f"an empty list ({text!r}): give at least one {what}, comma-separated, like {example}")
    return found


def int_list(text: str, what: str = "length", low: int = 1) -> tuple[int, ...]:
    """"512, 1024" -> (512, 1024); each `what` a whole number, `low` or more; at least one."""
    found = items(text, what, "512,1024")
    try:
        values = tuple(int(x) for x in found)
    except ValueError:
        raise ValueError(f"bad list of whole numbers {text!r}: write them comma-separated, like 512,1024") from None
    for value in values:
        checks.whole(value, what, low)
    return values


def float_list(text: str, what: str = "number") -> tuple[float, ...]:
    """"0, 0.5, 1" -> (0.0, 0.5, 1.0); at least one."""
    found = items(text, what, "0,0.5,1")
    try:
        return tuple(float(x) for x in found)
    except ValueError:
        raise ValueError(f"bad list of numbers {text!r}: write them comma-separated, like 0,0.5,1") from None


def str_list(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    """"slerp, lerp" -> ("slerp", "lerp"); each one of `allowed`; at least one."""
    found = tuple(items(text, what, ",".join(allowed[:2])))
    for item in found:
        if item not in allowed:
            raise ValueError(f"unknown {what} {item!r}; choose from {', '.join(allowed)}")
    return found


def one_of(values: tuple, flag: str):
    """Speed times one merge variant; a list is for fidelity's grid."""
    if len(values) != 1:
        raise ValueError(f"speed times one variant: give {flag} a single value")
    return values[0]


def merge_fields(args, **overrides) -> dict:
    """The merge setting `merge_options` (and `interpolation_options`, where given) read, as raw MergeSettings fields
    (all but the cutoffs), for `merge_settings`."""
    fields = {"keep_start": args.keep_start, "keep_end": args.keep_end, "keep_recent": args.keep_recent,
              "ratio": args.ratio, "choice": args.choice,
              "attention_window": args.attention_window, "attention_keep": args.attention_keep,
              "attention_reach": args.attention_reach, "attention_keep_share": args.attention_keep_share,
              "cosine_share": args.cosine_share}
    fields.update({name: getattr(args, name) for name in ("method", "positions") if hasattr(args, name)})
    return {**fields, **overrides}


def check_flags_taken(args) -> None:
    """With --preset and no --cutoffs, no setting takes the merge flags (a preset sets every field but how its slots
    are made): one given there would be dropped without a word, and the figures would say less than the command line.
    Refused instead, naming the flags (a flag given at its default value changes nothing and passes)."""
    if not getattr(args, "preset", None) or args.cutoffs is not None:
        return
    defaults = merge_fields(merge_options("").parse_args([]))
    given = [name for name, value in merge_fields(args).items()
             if name in defaults and name not in ("method", "positions") and value != defaults[name]]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"{flags}: --preset sets every merge field but --method and --positions, and no --cutoffs "
                         f"are given to take them; write the setting out with --cutoffs and its flags "
                         f"(slerpviz/presets.py holds each preset's) or drop them")


def merge_settings(args, cutoffs, **overrides) -> MergeSettings:
    """The merge setting the options read, with these cutoffs (a schedule; None: every schedule's, cutoffs aside),
    through the library's one parser of merge settings (slerpviz.settings.merge_settings), as the page's and the
    CLI's: per-cutoff ratios are counted against the schedule, in the same words."""
    return checks.merge_settings(cutoffs=None if cutoffs is None else list(cutoffs), **merge_fields(args, **overrides))


def check_out(out: Path) -> None:
    """--out, checked before any work: a file is written in the folder and removed, so that a folder that cannot take
    the results (under /proc, read-only, a file in the way) is one error line now, not a traceback after the whole run
    that loses its results. A folder made for the check is removed again: bad input leaves nothing behind."""
    out = Path(out)
    made = [folder for folder in (out, *out.parents) if not folder.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise ValueError(f"--out {out}: cannot write the results there ({error.strerror or error})") from None
    finally:
        for folder in made:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()


# ----------------------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------------------


def device_of(args) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def on_gpu(args) -> bool:
    return device_of(args).startswith("cuda")


@contextlib.contextmanager
def torch_threads(args, one_when_quick: bool = False):
    """--threads in force while the run lasts (with `one_when_quick`, 1 for --quick on a CPU: a smoke run must
    finish in time on a busy machine), and torch's count as it was after it: called from Python (tests), the
    process is left as it was."""
    before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    elif one_when_quick and args.quick and not on_gpu(args):
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_engine(args):
    """(engine, name) from `model_options`: the named (or embedded) model, or random weights of --shape."""
    device = device_of(args)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but this machine has no CUDA GPU")
    if args.shape:
        engine = random_weight_engine(args.shape, device, DTYPES.get(args.dtype), args.seed)
        return engine, f"{args.shape} (random weights)"
    name = args.model or EMBEDDED
    return named_engine(name, device), name


def guarded(args, run) -> int:
    """`run()` with --threads in force (1 for --quick on a CPU) and --out checked first; bad settings or paths are
    one line on stderr and status 2, not a traceback."""
    with torch_threads(args, one_when_quick=True):
        try:
            check_out(args.out)
            return run()
        except (ValueError, FileNotFoundError) as error:  # bad settings or paths: say what is wrong, no traceback
            print(f"error: {error}", file=sys.stderr)
            return 2


def describe_model(engine, name: str) -> dict:
    dtype = engine.dtype
    return {"name": name, "family": engine.config.model_type, "dtype": str(dtype).removeprefix("torch."),
            **asdict(Shape.from_config(engine.config, dtype))}
