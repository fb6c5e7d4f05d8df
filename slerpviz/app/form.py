"""The page's form: its fields by name, the request they make, and settings written back as field values.

`Form` is the one list of the page's inputs. Its field order is the order every endpoint takes them in (/plan and
/generate, from the page and from any API client), the layout hands its controls to the events in that order, and
the callbacks bind the values they get to it by name. A field added later goes at the end, with a default, so that
positional API calls written for fewer inputs keep working.

Every field is checked before any model work: the merge fields by `slerpviz.settings.merge_settings`, the one parser
of merge settings (the command line's and the benchmarks' too), the rest by `check_allowed`, `check_sampling` and
the checks of `slerpviz.settings`; a bad value raises ValueError with one line that names the field and says what is
allowed. What depends on the model (a cutoff past its depth, spans longer than the tokenised prompt, the context)
is checked by `MergingEngine.validate` once the prompt is tokenised (`resident.plan_trace`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .. import settings as checks
from ..engine import MODES, MergeSettings, Sampling, check_sampling
from ..models import EMBEDDED, check_allowed

# The page's own limits, which every API client meets too: the longest generation one request may hold the device for,
# and the temperature slider's range.
MAX_NEW_TOKENS = 512
MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class Form:
    """The page's inputs as any client sends them (raw: text, numbers, lists, None), by name."""

    prompt: Any
    model: Any
    chat: Any
    cutoff: Any
    more_cutoffs: Any
    keep_start: Any
    keep_end: Any
    method: Any
    positions: Any
    mode: Any
    max_new_tokens: Any
    temperature: Any
    seed: Any
    # Added later, so they have defaults: older positional calls send fewer values.
    ratio: Any = 1.0
    choice: Any = "consecutive"
    proportional: Any = False
    attention_window: Any = MergeSettings.attention_window
    attention_keep: Any = MergeSettings.attention_keep
    ratios: Any = ""
    attention_reach: Any = MergeSettings.attention_reach
    attention_keep_share: Any = MergeSettings.attention_keep_share
    keep_recent: Any = MergeSettings.keep_recent


# The form's fields, in the order the endpoints take them.
FIELDS = tuple(field.name for field in dataclasses.fields(Form))
# The fields an example fills in, and those a merge preset fills in, in the order the click handlers return them.
EXAMPLE_FIELDS = ("prompt", "chat", "mode", "max_new_tokens")
MERGE_FIELDS = ("cutoff", "more_cutoffs", "keep_start", "keep_end", "method", "positions", "ratio", "ratios", "choice",
                "proportional", "attention_window", "attention_keep", "attention_reach", "attention_keep_share",
                "keep_recent")


@dataclass(frozen=True)
class Request:
    """A form checked and turned into what the engine takes."""

    prompt: str
    model: str
    chat: bool
    settings: MergeSettings
    sampling: Sampling
    mode: str


def parse_cutoffs(cutoff, more_cutoffs) -> tuple[int, ...]:
    """The main cutoff plus any further ones (a list, or text like "20, 25"), in order; a layer
    given twice merges twice there (slerpviz.settings.layers)."""
    return checks.layers(cutoff, more_cutoffs)


def parse(form: Form) -> Request:
    """A form as engine settings; `ratios` (one per cutoff, in layer order: "0.5, 1") overrides `ratio` when given."""
    prompt = checks.text(form.prompt, "prompt")
    model = EMBEDDED if form.model is None or form.model == "" else form.model
    check_allowed(model)
    chat = checks.flag(form.chat, "chat")
    cutoffs = parse_cutoffs(form.cutoff, form.more_cutoffs)
    slider = checks.real(form.ratio, "merge ratio", 0.0, 1.0)  # one number, whether or not `ratios` is used
    per_cutoff = form.ratios
    blank = (per_cutoff is None or (isinstance(per_cutoff, str) and not per_cutoff.strip())
             or (isinstance(per_cutoff, (list, tuple)) and not per_cutoff))  # empty: the slider's ratio
    # The library's one parser of merge settings (as the command line's and the benchmarks'): the same words for
    # the same mistake, and "0.5, 1" read as everywhere else.
    settings = checks.merge_settings(
        cutoffs=cutoffs, keep_start=form.keep_start, keep_end=form.keep_end, method=form.method,
        positions=form.positions, ratio=slider if blank else per_cutoff, choice=form.choice,
        proportional=form.proportional, attention_window=form.attention_window, attention_keep=form.attention_keep,
        attention_reach=form.attention_reach, attention_keep_share=form.attention_keep_share,
        keep_recent=form.keep_recent,
    )
    mode = checks.one_of(form.mode, "mode", MODES)  # MergingEngine.validate checks it alike, once there is a model
    # The page's limits are tighter than the engine's (check_sampling), and each is worded for its field.
    sampling = Sampling(max_new_tokens=checks.whole(form.max_new_tokens, "max new tokens", 1, MAX_NEW_TOKENS),
                        temperature=checks.real(form.temperature, "temperature", 0.0, MAX_TEMPERATURE),
                        seed=checks.whole(form.seed, "seed", 0, checks.SEED_LIMIT - 1))
    check_sampling(sampling)
    return Request(prompt, model, chat, settings, sampling, mode)


def parse_request(*values, **named) -> Request:
    """The form's values as sent (positionally in FIELDS' order, or by name) as a checked request."""
    return parse(Form(*values, **named))


# --------------------------------------------------------------------------------------------------------------------
# Settings back into field values
# --------------------------------------------------------------------------------------------------------------------


def merge_values(settings: MergeSettings, num_layers: int) -> dict:
    """A MergeSettings as the values of the form's merge fields (MERGE_FIELDS), so that parsing them gives it back:
    the first cutoff on the slider, the rest as further cutoffs; one ratio on the slider, or per-cutoff ratios as
    text when they differ."""
    cutoffs = sorted(settings.cutoffs) or [num_layers]  # no cutoff: merge after the last layer, i.e. never
    ratios = settings.ratio if isinstance(settings.ratio, tuple) else (settings.ratio,)
    uniform = len(set(ratios)) == 1
    return dict(
        cutoff=cutoffs[0], more_cutoffs=list(cutoffs[1:]), keep_start=settings.keep_start,
        keep_end=settings.keep_end, method=settings.method, positions=settings.positions, ratio=float(ratios[0]),
        ratios="" if uniform else ", ".join(f"{r:g}" for r in ratios), choice=settings.choice,
        proportional=settings.proportional, attention_window=settings.attention_window,
        attention_keep=settings.attention_keep, attention_reach=settings.attention_reach,
        attention_keep_share=settings.attention_keep_share, keep_recent=settings.keep_recent,
    )


def fit_cutoffs(num_layers: int, cutoff=None, more_cutoffs=None) -> tuple[int, list]:
    """The cutoff fields' values kept within a model's depth, for when another model is loaded: the cutoff clamped
    to the depth (the middle layer when it is not a whole number), further cutoffs past the depth or not layer
    numbers dropped."""
    try:
        value = min(checks.whole(cutoff, "cutoff", 0), num_layers)
    except ValueError:
        value = num_layers // 2
    kept = [c for c in (more_cutoffs or []) if str(c).strip().isdigit() and int(c) <= num_layers]
    return value, kept
