"""Settings, and every check of a raw value, in one room.

`MergeSettings` (where and how to merge) and `Sampling` (how to decode) are what the engine takes. The page, its API,
the command line and the benchmarks all take values from outside: JSON from any client, text from a shell. Each
function here turns one raw value into the type the engine takes, or raises ValueError with one line that names
the field and says what is allowed; `Parser` is the argparse both shell commands read their flags with (a bad flag
is one line and status 2). Nothing is rounded or coerced behind the caller's back: 2.5 is not a whole
number, "no" is not a yes/no answer, NaN is not a temperature.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, is_dataclass

from .merge import CHOICES, METHODS, POSITION_MODES

MODES = ("cached", "recompute")  # with a per-layer KV cache, or re-running the whole sequence every step (the article)
PREFILLS = ("eager", "compiled")  # the prompt's layers and merges as written, or through torch.compile


@dataclass(frozen=True)
class MergeSettings:
    """Where and how to merge. No cutoffs means the base model."""

    cutoffs: tuple[int, ...] = ()
    keep_start: int = 0
    keep_end: int = 0
    method: str = "slerp"
    positions: str = "mean"
    ratio: float | tuple[float, ...] = 1.0  # share of eligible pairs merged, one for all cutoffs or one each
    choice: str = "consecutive"  # which pairs: consecutive, uniform, the most similar or least attended at the cutoff
    proportional: bool = False  # add log(tokens held) to a merged key's attention logit
    size_weighted: bool = True  # t follows the tokens each side holds when merged slots merge again
    # `attention` choice: the last W prompt tokens whose attention scores the others, and the most-attended tokens
    # that never merge. Defaults by measurement (docs/measurements.md, "Merge what the prompt is not looking at"):
    # W = 8 kept the pass key better than 32, and keeping 32 tokens lifted top-1 from 0.81 to 0.94 at 15+20 (n = 72).
    attention_window: int = 8
    attention_keep: int = 32
    # `attention` choice: a kept budget that grows with the prompt, this share of its tokens where that is more than
    # attention_keep (0: the budget is attention_keep alone). A fixed 32 kept the multi-key answer at 512 to 1,024
    # tokens but lost some at 2,048, where 128 kept them; 1/16 (32 at 512, 128 at 2,048) is in the recommended and
    # fast presets (docs/measurements.md, "A kept budget that grows with the prompt").
    attention_keep_share: float = 0.0
    # `attention` choice: a pair ranks with the most attended token within this many tokens either side (0: alone);
    # the kept budget stays the most-attended tokens themselves. Measured in docs/measurements.md ("Reach"): 4 to 12
    # kept most of the retrieval that 0 lost at 1.5x, 7 best; the recommended and fast presets use 7.
    attention_reach: int = 0
    # `attention` choice: the share of the pair ranking given to how unlike the pair is (1 - cosine); 0 ranks by
    # attention alone (see pairs.least_attended_on_grid).
    cosine_share: float = 0.0
    # The last this many prompt tokens never merge, or every token of a shorter prompt: unlike keep_end, which a
    # prompt must hold, it fits any prompt, so a preset can carry it. The next token leans on them most: in recommended,
    # keeping the last 32 lowered KL(base ‖ merged) in 559 of 696 tuning windows for 0.3-1 % of the FLOP limit from
    # 512 tokens on (docs/measurements.md, seventeenth pass).
    keep_recent: int = 0

    @property
    def most_protected(self) -> int:
        """The most prompt tokens the spans protect, on a prompt long enough to hold them all."""
        return self.keep_start + max(self.keep_end, self.keep_recent)

    def protected_end(self, prompt_length: int) -> int:
        """How many tokens at the end of a prompt of this length never merge (see `protected_end`)."""
        return protected_end(prompt_length, self.keep_start, self.keep_end, self.keep_recent)

    def kept_budget(self, prompt_length: int) -> int:
        """How many of the most-attended tokens never merge, for a prompt of this many tokens."""
        return max(int(self.attention_keep), round(self.attention_keep_share * prompt_length))

    def __post_init__(self):
        # Stages run in layer order; per-cutoff ratios travel with their cutoffs (cutoffs 20, 10 with ratios 1, 0.5
        # merge half at layer 10 and all at layer 20).
        order = sorted(range(len(self.cutoffs)), key=lambda i: self.cutoffs[i])
        if isinstance(self.ratio, (tuple, list)):
            ratios = tuple(self.ratio)
            if len(ratios) == len(self.cutoffs):
                ratios = tuple(ratios[i] for i in order)
            object.__setattr__(self, "ratio", ratios)
        object.__setattr__(self, "cutoffs", tuple(self.cutoffs[i] for i in order))


def protected_end(prompt_length: int, keep_start: int, keep_end: int, keep_recent: int) -> int:
    """The protected end of a prompt: keep_end, or the recent window where that is longer, as much of it as the
    prompt holds after the protected start."""
    return max(keep_end, min(keep_recent, max(prompt_length - keep_start, 0)))


def describe(setting) -> str:
    """A merge setting (MergeSettings, or a mapping of its fields such as a trace's settings or a result row) in words,
    naming only what differs from the defaults: 'cutoff 15', 'cutoff 15+20, ratio 0.5/1, attention, W 8, keep top
    32', ... The one description of a setting: the command line prints it beside the merged text, and it labels the
    benchmarks' variants, so it is also the key their result files (assets/results/) are read by: its wording stays.
    (It describes; it is not input: per-cutoff ratios are written "0.5, 1" wherever they are read.)"""
    fields = asdict(setting) if is_dataclass(setting) else dict(setting)
    default = MergeSettings()
    cutoffs = fields["cutoffs"]
    parts = [f"cutoff {cutoffs if isinstance(cutoffs, str) else '+'.join(map(str, cutoffs))}"]
    ratio = fields.get("ratio", 1.0)
    ratios = tuple(ratio) if isinstance(ratio, (tuple, list)) else (ratio,)
    if any(r != 1.0 for r in ratios):
        parts.append("ratio " + "/".join(f"{r:g}" for r in ratios))
    choice = fields.get("choice", default.choice)
    if choice != default.choice:
        parts.append(choice)
    if choice == "attention":
        parts.append(f"W {fields.get('attention_window', default.attention_window)}")
        if fields.get("attention_keep"):
            parts.append(f"keep top {fields['attention_keep']}")
        if fields.get("attention_keep_share"):
            parts.append(f"keep share {float(fields['attention_keep_share']):g}")
        if fields.get("attention_reach"):
            parts.append(f"reach {fields['attention_reach']}")
        if fields.get("cosine_share"):
            parts.append(f"cosine share {fields['cosine_share']:g}")
    if fields.get("keep_start") or fields.get("keep_end"):
        parts.append(f"protect {fields.get('keep_start', 0)}/{fields.get('keep_end', 0)}")
    if fields.get("keep_recent"):
        parts.append(f"recent {fields['keep_recent']}")
    if fields.get("proportional"):
        parts.append("proportional")
    for name in ("method", "positions"):
        if fields.get(name, getattr(default, name)) != getattr(default, name):
            parts.append(f"{name} {fields[name]}")
    return ", ".join(parts)


@dataclass(frozen=True)
class Sampling:
    """Decoding: temperature 0 is greedy; otherwise temperature and top-p with a seeded generator."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


def check_sampling(sampling: Sampling) -> None:
    """Decoding settings that no model can use, refused before any model work."""
    if not isinstance(sampling.max_new_tokens, int) or sampling.max_new_tokens < 1:
        raise ValueError("max new tokens must be a whole number of at least 1")
    if not math.isfinite(sampling.temperature) or sampling.temperature < 0:
        raise ValueError("temperature must be a finite number, 0 (greedy) or more")
    if not math.isfinite(sampling.top_p) or not 0 < sampling.top_p <= 1:
        raise ValueError("top-p must be in (0, 1]")
    if not isinstance(sampling.seed, int) or not 0 <= sampling.seed < 2**63:
        raise ValueError("seed must be a whole number from 0 to 2**63 - 1")



def check_method(method) -> str:
    """The merge method, checked. This check and the two below take any value, not only text: the page and the
    command line check their raw input with them, as the engine checks its settings."""
    return one_of(method, "merge method", METHODS)


def check_positions(mode) -> str:
    return one_of(mode, "positions mode", POSITION_MODES)


def check_choice(choice) -> str:
    return one_of(choice, "pair choice", CHOICES)


def check_mode(mode) -> str:
    return one_of(mode, "mode", MODES)


def check_prefill(prefill) -> str:
    return one_of(prefill, "prefill", PREFILLS)


SEED_LIMIT = 2**63  # the seed feeds torch.Generator.manual_seed, which takes a signed 64-bit integer


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _as_number(value, field: str, allowed: str) -> float | int:
    """A real number from a JSON number or numeric text; booleans, NaN and infinities are refused."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{field} must be {allowed} (got {_shown(value)})")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        try:
            return int(text)  # exact, however large
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{field} must be {allowed} (got {_shown(value)})") from None
    else:
        raise ValueError(f"{field} must be {allowed} (got {_shown(value)})")
    if not math.isfinite(number):
        raise ValueError(f"{field} must be {allowed} (got {_shown(value)})")
    return number


def whole(value, field: str, low: int, high: int | None = None) -> int:
    """A whole number in [low, high]; 3.0 passes as 3, 3.5 is refused (never rounded)."""
    allowed = f"a whole number from {low} to {high}" if high is not None else f"a whole number, {low} or more"
    number = _as_number(value, field, allowed)
    if isinstance(number, float):
        if not number.is_integer():
            raise ValueError(f"{field} must be {allowed} (got {_shown(value)})")
        number = int(number)
    if number < low or (high is not None and number > high):
        raise ValueError(f"{field} must be {allowed} (got {_shown(value)})")
    return number


def real(value, field: str, low: float, high: float, low_open: bool = False) -> float:
    """A finite number in [low, high] (or (low, high] with low_open)."""
    allowed = f"a number from {low:g} to {high:g}" if not low_open else f"a number above {low:g}, up to {high:g}"
    number = float(_as_number(value, field, allowed))
    if number < low or number > high or (low_open and number == low):
        raise ValueError(f"{field} must be {allowed} (got {_shown(value)})")
    return number


def flag(value, field: str) -> bool:
    """True or false, and only those: the text "no" is not a no."""
    if not isinstance(value, bool):
        raise ValueError(f"{field} must be true or false (got {_shown(value)})")
    return value


def one_of(value, field: str, choices: Sequence[str]) -> str:
    """A name from a fixed list: "unknown merge method 'avg'; choose one of ..." (the merge checks word theirs here)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {field} {_shown(value)}; choose one of {', '.join(choices)}")
    return value


def text(value, field: str) -> str:
    """Text a tokenizer can read: a string of valid Unicode (no lone surrogates), not blank."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"the {field} is empty")
    if not isinstance(value, str):
        raise ValueError(f"the {field} must be text (got {_shown(value)})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"the {field} holds a lone surrogate ({value[error.start]!r} at character {error.start}), which is not "
            "valid Unicode text"
        ) from None
    return value


def layers(cutoff, more_cutoffs, low: int = 0, high: int | None = None) -> tuple[int, ...]:
    """The cutoff plus any further cutoffs (a list, or text like "20, 25"), in order.

    The main cutoff is required; further cutoffs are optional. `high` (the model's depth) is checked where it is known.
    A layer given twice merges twice there, the second time pairing the slots of the first: groups of up to four
    neighbouring tokens become one slot at that layer (three times: up to eight).
    """
    if more_cutoffs is None or more_cutoffs == "":
        more = []
    elif isinstance(more_cutoffs, str):
        more = [part for part in more_cutoffs.replace(";", ",").split(",") if part.strip()]
    elif isinstance(more_cutoffs, (list, tuple)):
        more = list(more_cutoffs)
    else:
        raise ValueError(f"further cutoffs must be a list of layer numbers (got {_shown(more_cutoffs)})")
    chosen = [whole(cutoff, "cutoff", low, high), *(whole(value, "further cutoff", low, high) for value in more)]
    return tuple(sorted(chosen))


# Per-cutoff merge ratios have one syntax wherever they are read (the page's field, `python -m slerpviz generate
# --ratio`, `python -m slerpviz.bench ... --ratio`): numbers separated by commas, one per cutoff, as in
# RATIO_EXAMPLE. A bench grid separates its variants by commas too, but --ratio is never a grid: it is one setting,
# each of its ratios meeting one cutoff of every schedule (--cutoffs 15+20 --ratio 0.5,1).
RATIO_EXAMPLE = "0.5,1"


def merge_ratio(value) -> float | tuple[float, ...]:
    """The share of eligible pairs merged: one number for every cutoff, or one per cutoff, in the cutoffs' order,
    as a list or as text with the ratios separated by commas ("0.5, 1"; semicolons pass too). A single value is
    the "merge ratio"; each of a list is a "ratio per cutoff"; each is a number from 0 to 1. A list of one is that
    one ratio, for every cutoff. The benchmarks' old "0.5/1" is refused with a line naming the commas."""
    if isinstance(value, str):
        if "/" in value:
            raise ValueError(f"ratio per cutoff: separate the ratios with commas, like {RATIO_EXAMPLE} (got "
                             f"{_shown(value)})")
        parts = [part for part in value.replace(";", ",").split(",") if part.strip()]
        if len(parts) == 1:
            return real(parts[0], "merge ratio", 0.0, 1.0)
        if not parts:
            raise ValueError(f"merge ratio must be a number from 0 to 1, or one per cutoff like {RATIO_EXAMPLE} "
                             f"(got {_shown(value)})")
    elif isinstance(value, (list, tuple)):
        parts = list(value)
        if not parts:
            raise ValueError(f"ratio per cutoff: an empty list; give one ratio, or one per cutoff like "
                             f"{RATIO_EXAMPLE}")
    else:
        return real(value, "merge ratio", 0.0, 1.0)
    numbers = tuple(real(part, "ratio per cutoff", 0.0, 1.0) for part in parts)
    return numbers[0] if len(numbers) == 1 else numbers


def ratio_count(ratio: float | tuple[float, ...], cutoffs: Sequence[int] | int) -> None:
    """Per-cutoff ratios (from `merge_ratio`), one for each cutoff: `cutoffs` are the layers, or only their count
    where the layers are not known yet (a preset's, before the model's depth is). One number fits any cutoffs."""
    if not isinstance(ratio, tuple):
        return
    count = cutoffs if isinstance(cutoffs, int) else len(cutoffs)
    if len(ratio) != count:
        layers = "" if isinstance(cutoffs, int) else f" ({', '.join(map(str, cutoffs))})"
        raise ValueError(f"ratio per cutoff: {len(ratio)} ratios for {count} cutoffs{layers}: give one per cutoff, "
                         "in the cutoffs' order, or one for all")


MAX_ATTENTION_REACH = 256


def attention_budget(window, keep, reach=0, keep_share=0.0) -> tuple[int, int, int, float]:
    """The `attention` pair choice's numbers: the window W (the last W prompt tokens whose attention scores the
    others, at least 1), the budget of most-attended tokens that never merge (0 or more), the reach (a pair ranks
    with the most attended token within that many tokens either side, 0 to MAX_ATTENTION_REACH), and the share of
    the prompt the budget grows to on long prompts (0 to 1)."""
    return (whole(window, "attention window", 1), whole(keep, "attention keep", 0),
            whole(reach, "attention reach", 0, MAX_ATTENTION_REACH), real(keep_share, "attention keep share", 0, 1))


_DEFAULT = MergeSettings()


def merge_settings(*, cutoffs=(), keep_start=_DEFAULT.keep_start, keep_end=_DEFAULT.keep_end,
                   method=_DEFAULT.method, positions=_DEFAULT.positions, ratio=_DEFAULT.ratio,
                   choice=_DEFAULT.choice, proportional=_DEFAULT.proportional,
                   size_weighted=_DEFAULT.size_weighted, attention_window=_DEFAULT.attention_window,
                   attention_keep=_DEFAULT.attention_keep, attention_reach=_DEFAULT.attention_reach,
                   attention_keep_share=_DEFAULT.attention_keep_share,
                   cosine_share=_DEFAULT.cosine_share, keep_recent=_DEFAULT.keep_recent) -> MergeSettings:
    """MergeSettings from raw values, every field checked by the checks above (a ValueError of one line naming the
    field): the one parser of merge settings, which the page (`app.form.parse`), the command line (`python -m
    slerpviz generate`) and the benchmarks (`bench.options.merge_settings`) all call, so the same values make the same
    settings and the same mistakes the same line everywhere.

    `cutoffs`: the layers, in any order (a list; each a whole number, 0 or more; the model's depth is checked once
    there is a model), or None where they are not known here (a template: no cutoffs, and per-cutoff ratios not
    counted). `ratio`: one number, or one per cutoff in the cutoffs' order, as a list or as "0.5, 1"
    (`merge_ratio`). The rest as MergeSettings names them; a field left out keeps MergeSettings' default."""
    if cutoffs is None:
        chosen = ()
    elif isinstance(cutoffs, (list, tuple)):
        chosen = tuple(whole(cutoff, "cutoff", 0) for cutoff in cutoffs)
    else:
        raise ValueError(f"cutoffs must be a list of layer numbers (got {_shown(cutoffs)})")
    start, end = whole(keep_start, "keep start", 0), whole(keep_end, "keep end", 0)
    method, positions = check_method(method), check_positions(positions)
    ratio = merge_ratio(ratio)
    if cutoffs is not None:
        ratio_count(ratio, chosen)
    choice = check_choice(choice)
    window, keep, reach, keep_share = attention_budget(attention_window, attention_keep, attention_reach,
                                                       attention_keep_share)
    return MergeSettings(
        cutoffs=chosen, keep_start=start, keep_end=end, method=method, positions=positions, ratio=ratio,
        choice=choice, proportional=flag(proportional, "proportional attention"),
        size_weighted=flag(size_weighted, "size weighted"), attention_window=window, attention_keep=keep,
        attention_reach=reach, attention_keep_share=keep_share, cosine_share=real(cosine_share, "cosine share", 0, 1),
        keep_recent=whole(keep_recent, "keep recent", 0),
    )


class Parser(argparse.ArgumentParser):
    """argparse for raw values from a shell (`python -m slerpviz` and `python -m slerpviz.bench`): a bad flag or value
    is one line on stderr and status 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def one_line(error: BaseException) -> str:
    """An error in one line: hub errors run to a paragraph with links; the first sentence says what happened."""
    message = " ".join(str(error).split()) or type(error).__name__
    cut = message.find(". ")
    if 0 < cut < 200:
        return message[: cut + 1]
    if len(message) <= 200:
        return message
    return message[: message.rfind(" ", 0, 200) if " " in message[:200] else 200].rstrip(" :,;") + " …"
