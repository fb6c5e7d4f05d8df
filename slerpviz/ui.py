"""The Gradio page: base and merged generations streamed side by side, with the Plotly views.

The page only wires. What it shows comes from the library: the engine runs the two generations, `interleave`
interleaves them step by step (so each is timed on its own), the small summary functions below turn traces into
the panels' figures, and `slerpviz.plots` draws the pictures.

One model lives on the device at a time (`EngineHolder`); generations and model swaps queue for it one at a time,
and a bounded queue tells everyone else their place in line.
"""

from __future__ import annotations

import ctypes
import gc
import html
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch
from gradio.components.plot import PlotData
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import inputs, plots, presets
from .bench.retrieval import find_passkey, is_correct
from .engine import MODES, MergeSettings, MergingEngine, Sampling, Trace, check_sampling, interleave
from .merge import CHOICES, METHODS, POSITION_MODES
from .models import ALLOWED_MODELS, EMBEDDED, check_allowed, load

log = logging.getLogger(__name__)

GPU_MODEL = "mistralai/Mistral-7B-Instruct-v0.2"
DEFAULT_LAYERS = 30  # the controls' range before a model is loaded (the embedded model's depth)
GPU_MODEL_MEMORY = 20 * 2**30  # bf16 weights (~14.5 GB) plus room for the caches of both generations
QUEUE_SIZE = 64  # bounded: twenty users at once all get a place in line, a flood gets "queue full"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
# Streaming a latency or KV figure costs more than a line of text; refresh them every few tokens and at the end.
PLOT_EVERY = 8

# The page's own limits, which every API client meets too: the longest generation one request may hold the device for,
# and the temperature slider's range.
MAX_NEW_TOKENS = 512
MAX_TEMPERATURE = 2.0
# The page takes no files; Gradio's upload route exists anyway, so cap what it accepts.
MAX_FILE_SIZE = "1mb"

try:  # On a ZeroGPU Space the GPU is attached only inside functions under this decorator; elsewhere a no-op.
    import spaces

    gpu_task = spaces.GPU(duration=120)
except ImportError:  # pragma: no cover - depends on the machine
    def gpu_task(function):
        return function


def on_zero_gpu() -> bool:
    """A ZeroGPU Space says so in its environment; there the GPU exists only inside `gpu_task` functions."""
    return bool(os.environ.get("SPACES_ZERO_GPU"))


def default_model() -> str:
    """$SLERPVIZ_MODEL if set; Mistral-7B-Instruct on ZeroGPU or where a GPU has room for it; else the embedded model.

    On ZeroGPU the GPU cannot be asked about outside a `gpu_task`, and its slices hold a 7B model in bf16.
    """
    chosen = os.environ.get("SLERPVIZ_MODEL")
    if chosen:
        return chosen
    if on_zero_gpu():
        return GPU_MODEL
    if torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory >= GPU_MODEL_MEMORY:
        return GPU_MODEL
    return EMBEDDED


# --------------------------------------------------------------------------------------------------------------------
# The model on this device
# --------------------------------------------------------------------------------------------------------------------


def load_on_device(name: str, progress: Callable[[str], None]) -> MergingEngine:
    """Load on the GPU where there is one (the embedded model too, which `load` otherwise keeps on the CPU)."""
    return load(name, device="cuda" if torch.cuda.is_available() else None, progress=progress)


def fetch_weights(name: str, progress: Callable[[str], None]) -> None:
    """Bring a hub model's files onto this machine, so that a model out of reach fails here, before anything is freed.

    The embedded model is already here. Only the files `load` reads are fetched (safetensors, not the .bin copies).
    """
    if name == EMBEDDED:
        return
    from huggingface_hub import snapshot_download

    progress(f"Fetching {name}")
    snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt"])


def load_for_zero_gpu(name: str, progress: Callable[[str], None] = print) -> MergingEngine:
    """ZeroGPU's documented pattern: load whole on the CPU (no device_map: there is no GPU to map onto yet), then move
    to "cuda" at module level; `spaces` completes the move when a `gpu_task` gets a GPU."""
    check_allowed(name)
    if name == EMBEDDED:
        engine = load(name, device="cpu", progress=progress)
    else:
        progress(f"Loading {name} (bf16, for ZeroGPU)")
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16, attn_implementation="sdpa")
        engine = MergingEngine(model, tokenizer)  # refuses an unsupported family
    engine.model.to("cuda")
    return engine


class EngineHolder:
    """The one engine on this device.

    A load runs in a background thread so callers can show its progress instead of a frozen page; callers that
    arrive while a load is under way follow it rather than start another. Only `switch` starts a load (the page's
    model control, and a page opening on an empty device); generations and plans only follow one.

    A switch never leaves the device empty: a hub model's files are fetched before the resident model is freed (a
    GPU holds one 7B model, so there it is freed before the new one loads, under `device_lock` so never during a
    step), and if the new model still fails, the previous one is loaded back. `device_lock` is held around every
    forward step, so at most one step runs on the device at any moment, whatever the queue does on a cancel.
    """

    def __init__(self, loader: Callable[..., MergingEngine] | None = None,
                 fetcher: Callable[[str, Callable[[str], None]], None] | None = None, free_first: bool | None = None):
        self._loader = loader or load_on_device
        self._fetcher = fetcher or fetch_weights
        self._free_first = free_first  # None: where there is a GPU
        self._state = threading.Lock()  # guards the fields below
        self.device_lock = threading.Lock()
        self.name: str | None = None
        self.engine: MergingEngine | None = None
        self.message = ""
        self._thread: threading.Thread | None = None
        self._target: str | None = None
        self._outcome: tuple[str, BaseException | None] | None = None

    @property
    def busy_loading(self) -> str | None:
        with self._state:
            return self._target if self._thread is not None and self._thread.is_alive() else None

    def install(self, name: str, engine: MergingEngine) -> None:
        """Hold an engine loaded elsewhere (on ZeroGPU, at import)."""
        with self._state:
            self.engine, self.name, self._outcome = engine, name, (name, None)

    def switch(self, name: str, poll: float = 0.25) -> Iterator[str]:
        """Make `name` the loaded model, yielding progress lines until it is; raise if its load fails (the previous
        model then stays loaded)."""
        check_allowed(name)
        while True:
            with self._state:
                if self.name == name and self.engine is not None and not self._loading_locked():
                    return
                if not self._loading_locked():
                    self._start(name)
                thread, target = self._thread, self._target
            yield from self._wait(thread, target, poll)
            with self._state:
                outcome = self._outcome
            if outcome is not None and outcome[0] == name and outcome[1] is not None:
                raise outcome[1]

    def following(self, name: str, poll: float = 0.25) -> Iterator[str]:
        """Wait until `name` is loaded, following a load under way; never start one. Raise ValueError when `name`
        is neither loaded nor loading: switching is the page's model control's job alone."""
        check_allowed(name)
        while True:
            with self._state:
                loading = self._loading_locked()
                if not loading and self.name == name and self.engine is not None:
                    return
                thread, target = self._thread, self._target
            if not loading:
                serving = f"the app serves {self.name}" if self.name else "no model is loaded yet"
                raise ValueError(f"model {name!r} is not loaded: {serving}. Only the page's Model menu switches "
                                 "models; choose it there, or ask for the model that is loaded.")
            yield from self._wait(thread, target, poll)
            with self._state:
                outcome = self._outcome
            if outcome is not None and outcome[0] == name and outcome[1] is not None:
                raise outcome[1]

    def ensure(self, name: str) -> MergingEngine:
        for _ in self.switch(name):
            pass
        return self.engine

    def preload(self, name: str) -> None:
        """Start loading in the background now (at startup), so the first visitor finds the model ready sooner."""
        with self._state:
            if self.name != name and not self._loading_locked():
                self._start(name)

    def _loading_locked(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _wait(self, thread: threading.Thread, target: str, poll: float) -> Iterator[str]:
        while thread.is_alive():
            yield self.message or f"Loading {target}"
            thread.join(poll)

    def _start(self, name: str) -> None:
        self._target, self._outcome, self.message = name, None, f"Loading {name}"
        self._thread = threading.Thread(target=self._load, args=(name,), name=f"load {name}", daemon=True)
        self._thread.start()

    def _load(self, name: str) -> None:
        def progress(message: str) -> None:
            self.message = message

        previous, freed = self.name, False
        try:
            self._fetcher(name, progress)
            free_first = torch.cuda.is_available() if self._free_first is None else self._free_first
            if free_first and self.engine is not None:
                # Two 7B models do not fit on one GPU: free the old one, but never in the middle of a step.
                with self.device_lock, self._state:
                    self.engine, self.name, freed = None, None, True
                release_memory()
            engine = self._loader(name, progress=progress)
            progress(f"Warming up {name}")
            engine.warm_up()  # one-time setup now, so the first timed comparison is not charged for it
        except BaseException as error:  # reported to every caller following this load
            log.exception("loading %s failed", name)
            if freed and previous is not None:
                self._restore(previous, progress)
            with self._state:
                self._outcome = (name, error)
            return
        with self._state:
            self.engine, self.name, self._outcome = engine, name, (name, None)

    def _restore(self, name: str, progress: Callable[[str], None]) -> None:
        """Load back the model a failed switch freed (its files are on this machine already)."""
        try:
            progress(f"Loading {name} back")
            engine = self._loader(name, progress=progress)
            engine.warm_up()
        except BaseException:  # noqa: BLE001 - the device stays empty; the next page to open loads a model
            log.exception("loading %s back failed", name)
            return
        with self._state:
            self.engine, self.name = engine, name


def release_memory() -> None:
    """Hand freed memory back: Python's garbage, the CUDA cache, and glibc's free lists (which otherwise keep a long
    prompt's figures and activations counted against the process long after they are gone)."""
    gc.collect()
    if not on_zero_gpu() and torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


ENGINES = EngineHolder()


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    prompt: str
    model: str
    chat: bool
    settings: MergeSettings
    sampling: Sampling
    mode: str


def parse_cutoffs(cutoff, more_cutoffs) -> tuple[int, ...]:
    """The main cutoff plus any further ones (a list, or text like "20, 25"), each layer once, in order."""
    return inputs.layers(cutoff, more_cutoffs)


DEFAULT_SETTINGS = MergeSettings()


def parse_request(prompt, model, chat, cutoff, more_cutoffs, keep_start, keep_end, method, positions, mode,
                  max_new_tokens, temperature, seed, ratio=1.0, choice="consecutive", proportional=False,
                  attention_window=DEFAULT_SETTINGS.attention_window, attention_keep=DEFAULT_SETTINGS.attention_keep,
                  ratios="") -> Request:
    """The page's raw inputs, as any client may send them, as engine settings.

    Every field is checked here, before any model work, and a bad one raises ValueError naming the field and what
    is allowed. What depends on the model (a cutoff past its depth, spans longer than the tokenised prompt, the
    context) is checked by the engine once the prompt is tokenised. `ratios` (one per cutoff, in layer order)
    overrides `ratio` when given.
    """
    prompt = inputs.text(prompt, "prompt")
    model = EMBEDDED if model is None or model == "" else model
    if not isinstance(model, str):
        raise ValueError(f"model must be one of: {', '.join(ALLOWED_MODELS)} (got {model!r})")
    check_allowed(model)
    chat = inputs.flag(chat, "chat")
    cutoffs = inputs.layers(cutoff, more_cutoffs)
    ratio = inputs.real(ratio, "merge ratio", 0.0, 1.0)
    per_cutoff = inputs.ratios(ratios, "ratio per cutoff")
    if isinstance(per_cutoff, tuple) and len(per_cutoff) != len(cutoffs):
        raise ValueError(f"ratio per cutoff: {len(per_cutoff)} ratios for {len(cutoffs)} cutoffs ("
                         f"{', '.join(map(str, cutoffs))}): give one per cutoff, in layer order, or leave it empty")
    window, keep = inputs.attention_budget(attention_window, attention_keep)
    settings = MergeSettings(
        cutoffs=cutoffs, keep_start=inputs.whole(keep_start, "keep start", 0),
        keep_end=inputs.whole(keep_end, "keep end", 0), method=inputs.one_of(method, "merge method", METHODS),
        positions=inputs.one_of(positions, "positions mode", POSITION_MODES),
        ratio=ratio if per_cutoff is None else per_cutoff, choice=inputs.one_of(choice, "pair choice", CHOICES),
        proportional=inputs.flag(proportional, "proportional attention"), attention_window=window,
        attention_keep=keep,
    )
    mode = inputs.one_of(mode, "mode", MODES)
    sampling = Sampling(max_new_tokens=inputs.whole(max_new_tokens, "max new tokens", 1, MAX_NEW_TOKENS),
                        temperature=inputs.real(temperature, "temperature", 0.0, MAX_TEMPERATURE),
                        seed=inputs.whole(seed, "seed", 0, inputs.SEED_LIMIT - 1))
    check_sampling(sampling)
    return Request(prompt, model, chat, settings, sampling, mode)


# --------------------------------------------------------------------------------------------------------------------
# Two generations, step by step
# --------------------------------------------------------------------------------------------------------------------


@gpu_task
def generation_steps(request: Request) -> Iterator[tuple[Trace, Trace]]:
    """The GPU part of a request: both generations, yielding (base trace, merged trace) after every step pair.

    It reaches the model through the module's holder, not an argument: on ZeroGPU the arguments and what it yields
    are pickled across to a GPU worker process, and plain settings and traces pickle, a model and its locks do not.
    """
    holder = ENGINES
    engine = holder.engine
    if on_zero_gpu():
        # Each GPU worker meets the model fresh: pay its one-time setup before the timed steps, not in the first.
        engine.warm_up()
    ids = engine.encode(request.prompt, request.chat)
    base = engine.start(ids, MergeSettings(), request.sampling, request.mode)
    merged = engine.start(ids, request.settings, request.sampling, request.mode)
    for _ in interleave(base, merged, lock=holder.device_lock):
        yield base.trace, merged.trace


# --------------------------------------------------------------------------------------------------------------------
# What the panels say
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """One panel's live figures, from its own steps only."""

    tokens: int
    first_token_s: float | None
    tokens_per_s: float | None  # decode rate: tokens after the first over their own seconds
    elapsed_s: float
    kv_bytes: int


def panel_figures(trace: Trace) -> Figures:
    tokens = len(trace.generated_ids)
    decode = sum(trace.decode_s)
    return Figures(
        tokens=tokens,
        first_token_s=trace.prefill_s if tokens else None,
        tokens_per_s=len(trace.decode_s) / decode if decode > 0 else None,
        elapsed_s=(trace.prefill_s + decode) if tokens else 0.0,
        kv_bytes=sum(trace.kv_bytes_per_layer),
    )


@dataclass(frozen=True)
class Agreement:
    first_difference: int | None  # index of the first generated token that differs; None when identical
    agreeing: int  # positions where both generated the same token
    compared: int  # the longer of the two generations

    @property
    def share(self) -> float:
        return self.agreeing / self.compared if self.compared else 1.0


def agreement(base_ids: Sequence[int], merged_ids: Sequence[int]) -> Agreement:
    """Compare the two generations position by position; a missing token (one stopped earlier) disagrees."""
    agreeing = sum(a == b for a, b in zip(base_ids, merged_ids))
    first = next((i for i, (a, b) in enumerate(zip(base_ids, merged_ids)) if a != b), None)
    if first is None and len(base_ids) != len(merged_ids):
        first = min(len(base_ids), len(merged_ids))
    return Agreement(first, agreeing, max(len(base_ids), len(merged_ids)))


def human_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"  # pragma: no cover


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} s"


def panel_markdown(trace: Trace, base: Trace | None = None, stopped: bool = False) -> str:
    """The live figures of one panel; the merged panel (given the base trace) adds what merging saved."""
    figures = panel_figures(trace)
    end = " · done" if trace.finished else " · stopped" if stopped else ""
    rows = [
        ("time to first token", _seconds(figures.first_token_s)),
        ("tokens per second (decode)", "—" if figures.tokens_per_s is None else f"{figures.tokens_per_s:.1f}"),
        ("elapsed (own steps)", _seconds(figures.elapsed_s if figures.tokens else None)),
        ("tokens generated", f"{figures.tokens}{end}"),
    ]
    if trace.mode == "recompute":
        rows.append(("KV cache", "none (recompute mode re-runs the whole sequence each step)"))
    else:
        kv = human_bytes(figures.kv_bytes) if figures.kv_bytes else "—"
        if base is not None and figures.kv_bytes and sum(base.kv_bytes_per_layer):
            kv += " · " + plots.kv_comparison(sum(base.kv_bytes_per_layer), figures.kv_bytes)
            if len(base.generated_ids) != figures.tokens:
                kv += f" (base at {len(base.generated_ids)} tokens)"
        rows.append(("KV cache", kv))
    length = f"{trace.prompt_length} prompt tokens"
    if trace.plan_pending:
        rows.append(("sequence", f"{length} → pairs chosen at the cutoff"))
    elif trace.cutoffs:
        stages = "".join(f" → {len(slots)} after layer {layer}" for slots, layer in zip(trace.groups, trace.cutoffs))
        rows.append(("sequence", length + stages))
    else:
        rows.append(("sequence", f"{length} at every layer"))
    return "| live figure | value |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


GREETING = "Type a prompt or click an example, then press **Run**."
PENDING_COMPARISON = "*The comparison appears when both generations have finished.*"


def comparison_markdown(base: Trace, merged: Trace, token_text: Callable[[int], str], stopped: bool = False) -> str:
    """Where the two generations part, and how much of them agrees: once both have finished, or over the tokens
    generated before a Stop."""
    prefix = ""
    if stopped and not (base.finished and merged.finished):
        reached = max(len(base.generated_ids), len(merged.generated_ids))
        prefix = f"**Stopped at token {reached}**; over the tokens generated so far: "
        if not reached:
            return "**Stopped at token 0**: the prompt was still running, nothing to compare."
    elif not (base.finished and merged.finished):
        return PENDING_COMPARISON
    result = agreement(base.generated_ids, merged.generated_ids)
    if result.first_difference is None:
        first = f"**Identical**: all {result.compared} generated tokens match."
    else:
        i = result.first_difference

        def shown(ids):
            return f"`{escape(plots.visible_token(token_text(ids[i])))}`" if i < len(ids) else "*(stopped)*"

        first = f"**First difference at generated token {i + 1}**: base {shown(base.generated_ids)} · merged " \
                f"{shown(merged.generated_ids)}."
    return f"{prefix}{first} **{result.share:.0%}** of tokens agree position by position ({result.agreeing} of " \
           f"{result.compared})." + passkey_markdown(base, merged, stopped)


def passkey_markdown(base: Trace, merged: Trace, stopped: bool = False) -> str:
    """When the prompt holds a pass key: did each side answer it? (Empty otherwise.)"""
    needle = find_passkey(base.tokens)
    if needle is None:
        return ""
    found = is_correct(needle.answer, base.text), is_correct(needle.answer, merged.text)
    verdict = {(True, True): "both found it", (False, False): "neither found it",
               (True, False): "base found it, merged did not", (False, True): "merged found it, base did not"}[found]
    when = " (in the tokens generated before Stop)" if stopped and not (base.finished and merged.finished) else ""
    return f"\n\n**Pass key {escape(needle.answer)}**: {verdict}{when}."


def status_markdown(base: Trace, merged: Trace, sampling: Sampling, stopped: bool = False) -> str:
    if stopped and not (base.finished and merged.finished):
        return f"**Stopped** at token {max(len(base.generated_ids), len(merged.generated_ids))}: both generations " \
               f"were cancelled together (base {len(base.generated_ids)} tokens, merged " \
               f"{len(merged.generated_ids)} tokens)."
    if base.finished and merged.finished:
        return f"**Done**: base {len(base.generated_ids)} tokens, merged {len(merged.generated_ids)} tokens."
    return f"**Generating…** base {len(base.generated_ids)}/{sampling.max_new_tokens} · merged " \
           f"{len(merged.generated_ids)}/{sampling.max_new_tokens} tokens"


def escape(text: str) -> str:
    """Model names, messages and tokens as literal text in Markdown or an error pop-up (both read HTML)."""
    return html.escape(text, quote=False)


def message_for(error: BaseException) -> str:
    """A page-sized message for an error: what went wrong and what to try, never a traceback."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return "Out of memory: try a shorter prompt, fewer new tokens or a smaller model."
    if isinstance(error, ValueError):
        return str(error)
    if isinstance(error, OSError):
        return f"Could not load the model: {error}"
    return f"{type(error).__name__}: {error}"


def page_error(error: BaseException) -> gr.Error:
    if not on_zero_gpu() and torch.cuda.is_available():  # on ZeroGPU the GPU was the worker's, and is gone
        torch.cuda.empty_cache()
    return gr.Error(escape(message_for(error)), print_exception=not isinstance(error, ValueError))


# --------------------------------------------------------------------------------------------------------------------
# The callbacks
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Outputs:
    """The components /generate streams to, in pairs: base | merged text, base | merged figures, then the views."""

    base_text: gr.Textbox
    merged_text: gr.Textbox
    base_stats: gr.Markdown
    merged_stats: gr.Markdown
    comparison: gr.Markdown
    pairing: gr.Plot
    lengths: gr.Plot
    latency: gr.Plot
    kv: gr.Plot
    status: gr.Markdown

    def __iter__(self):
        return iter(self.__dict__.values())


def plot_data(figure) -> PlotData:
    """A figure serialised once. A stream that yields the same PlotData again sends nothing for it (Gradio streams the
    difference from the last message), so a long prompt's pairing plot crosses the wire once per run, while an API
    client's last message still holds every view."""
    return PlotData(type="plotly", plot=figure.to_json())


@dataclass
class PageView:
    """What one page shows, kept in its session (a gr.State, changed in place): the trace its pairing plot was drawn
    from, and the generation under way, so that Stop can finalise the panels from where the runs stopped."""

    pairing: Trace | None = None
    base: Trace | None = None
    merged: Trace | None = None
    sampling: Sampling | None = None
    token_text: Callable[[int], str] | None = None
    labels_from: int = 0  # where the pairing plot's labelled span starts (long prompts)


class Page:
    """The callbacks, as plain methods so tests can call them without a browser."""

    def __init__(self):
        self.holder = ENGINES
        self.examples = examples()

    def _num_layers(self) -> int:
        engine = self.holder.engine
        return engine.num_layers if engine is not None else DEFAULT_LAYERS

    # Examples and presets -------------------------------------------------------------------------------------------

    def fill_example(self, index):
        """Every control an example sets (EXAMPLE_FIELDS + MERGE_FIELDS); a preset is read now, for the loaded model."""
        if not isinstance(index, int) or not 0 <= index < len(self.examples):
            return [gr.skip()] * (len(EXAMPLE_FIELDS) + len(MERGE_FIELDS))
        values = example_values(self.examples[index], self._num_layers())
        return [values[name] for name in (*EXAMPLE_FIELDS, *MERGE_FIELDS)]

    def fill_preset(self, name: str = "recommended"):
        """The merge controls (MERGE_FIELDS) set to a preset, for the loaded model's depth; the prompt stays."""
        values = merge_controls(presets.preset(name, self._num_layers()), self._num_layers())
        return [values[field] for field in MERGE_FIELDS]

    # The model ------------------------------------------------------------------------------------------------------

    def _layer_controls(self, engine: MergingEngine, cutoff=None, more=None):
        layers = engine.num_layers
        try:
            value = min(inputs.whole(cutoff, "cutoff", 0), layers)
        except ValueError:
            value = layers // 2
        kept = [c for c in (more or []) if str(c).strip().isdigit() and int(c) <= layers]  # drop typed-in junk
        return (gr.update(maximum=layers, value=value),
                gr.update(choices=list(range(layers + 1)), value=kept))

    def _ready(self) -> str:
        return f"**Ready**: {escape(self.holder.name)} ({self.holder.engine.num_layers} layers). {GREETING}"

    def _greeting(self) -> str:
        loaded = self.holder.name is not None and self.holder.busy_loading is None
        return self._ready() if loaded else GREETING

    def load_model(self, model: str, cutoff=None, more_cutoffs=None):
        """The page's model control: switch the shared model, streaming progress to the status line, then fit the
        cutoff controls. It runs in the device's queue, so it waits for running generations and none runs during it.

        A failed switch keeps the previous model: the status says why and the dropdown goes back to it.
        """
        skip = gr.skip()
        if on_zero_gpu():
            yield ("**The model is fixed on this Space**: ZeroGPU loads it when the app starts.",
                   gr.update(value=self.holder.name), skip, skip)
            return
        try:
            for message in self.holder.switch(model):
                yield f"**Loading…** {escape(message)}", skip, skip, skip
        except Exception as error:  # noqa: BLE001 - shown in the page, the app keeps serving
            serving = self.holder.name
            reason = message_for(error) if isinstance(error, ValueError) else inputs.one_line(error)
            message = f"Could not load {model}: {reason}"
            message += f" Still serving {serving}." if serving else ""
            gr.Warning(escape(message))
            yield (f"**Could not load** {escape(str(model))}: {escape(reason)}"
                   + (f" Still serving **{escape(serving)}**." if serving else ""),
                   gr.update(value=serving) if serving else skip, skip, skip)
            return
        yield self._ready(), gr.update(value=self.holder.name), *self._layer_controls(
            self.holder.engine, cutoff, more_cutoffs)

    def on_open(self, model: str, cutoff=None, more_cutoffs=None):
        """When a page opens: show the model the device holds, follow a load under way, or (on an empty device only)
        load the page's model. A page never swaps a loaded model just by opening."""
        skip = gr.skip()
        try:
            if self.holder.name is None and self.holder.busy_loading is None:
                messages = self.holder.switch(model if model in ALLOWED_MODELS else default_model())
            else:
                messages = self.holder.following(self.holder.busy_loading or self.holder.name)
            for message in messages:
                yield f"**Loading…** {escape(message)}", skip, skip, skip
        except Exception as error:  # noqa: BLE001
            raise page_error(error) from None
        yield self._ready(), gr.update(value=self.holder.name), *self._layer_controls(
            self.holder.engine, cutoff, more_cutoffs)

    # The plan -------------------------------------------------------------------------------------------------------

    def plan_trace(self, request: Request) -> Trace:
        engine = self.holder.engine
        ids = engine.encode(request.prompt, request.chat)
        engine.validate(ids.shape[-1], request.settings, request.sampling, request.mode)
        return engine.new_trace(ids, request.settings, request.mode)

    def plan(self, prompt, model, chat, cutoff, more_cutoffs, keep_start, keep_end, method, positions, mode,
             max_new_tokens, temperature, seed, ratio=1.0, choice="consecutive", proportional=False,
             attention_window=DEFAULT_SETTINGS.attention_window,
             attention_keep=DEFAULT_SETTINGS.attention_keep, ratios="", view=None):
        """The pairing plot (and sequence lengths per layer) for a prompt, without generating. It follows a model
        load under way but never starts one."""
        try:
            request = parse_request(prompt, model, chat, cutoff, more_cutoffs, keep_start, keep_end, method,
                                    positions, mode, max_new_tokens, temperature, seed, ratio, choice, proportional,
                                    attention_window, attention_keep, ratios)
            for message in self.holder.following(request.model):
                yield gr.skip(), gr.skip(), f"**Loading…** {escape(message)}"
            trace = self.plan_trace(request)
        except Exception as error:  # noqa: BLE001
            raise page_error(error) from None
        if view is not None:
            view.pairing = trace
        yield self._pairing_figure(trace, view), plots.length_figure(trace), self._plan_status(trace)

    def preview(self, prompt, model, chat, cutoff, more_cutoffs, keep_start, keep_end, method, positions, mode,
                max_new_tokens, temperature, seed, ratio=1.0, choice="consecutive", proportional=False,
                attention_window=DEFAULT_SETTINGS.attention_window,
                attention_keep=DEFAULT_SETTINGS.attention_keep, ratios="", view=None):
        """The plan as settings change: problems go to the status line, not a pop-up, while the user is typing. The
        pairing plot is re-sent only when the plan it shows has changed."""
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            return gr.skip(), gr.skip(), self._greeting()
        try:
            request = parse_request(prompt, model, chat, cutoff, more_cutoffs, keep_start, keep_end, method,
                                    positions, mode, max_new_tokens, temperature, seed, ratio, choice, proportional,
                                    attention_window, attention_keep, ratios)
            if self.holder.name != request.model or self.holder.busy_loading is not None:
                return gr.skip(), gr.skip(), "*The pairing plot appears once the model is loaded.*"
            trace = self.plan_trace(request)
        except Exception as error:  # noqa: BLE001
            return gr.skip(), gr.skip(), f"**Cannot plan**: {escape(message_for(error))}"
        shown = view.pairing if view is not None else None
        if shown is not None and plots.same_pairing(shown, trace):
            pairing = gr.skip()
        else:
            pairing = self._pairing_figure(trace, view)
            if view is not None:
                view.pairing = trace
        return pairing, plots.length_figure(trace), self._plan_status(trace)

    @staticmethod
    def _pairing_figure(trace: Trace, view: PageView | None):
        """The pairing plot, with a pass key in the prompt marked (its tokens and the slots they fell into)."""
        return plots.pairing_figure(trace, start=view.labels_from if view is not None else 0,
                                    needle=find_passkey(trace.tokens))

    def pairing_window(self, labels_from, view=None):
        """Redraw the pairing plot with its labels (a long prompt's detailed span) from another token."""
        try:
            start = inputs.whole(labels_from, "labels from token", 0)
        except ValueError as error:
            raise gr.Error(escape(str(error))) from None
        if view is None or view.pairing is None:
            return gr.skip()
        view.labels_from = start
        return self._pairing_figure(view.pairing, view)

    @staticmethod
    def _plan_status(trace: Trace) -> str:
        needle = find_passkey(trace.tokens)
        found = "" if needle is None else (f" The prompt holds **pass key {escape(needle.answer)}** (tokens "
                                           f"{needle.start}–{needle.end - 1}), marked in the pairing plot.")
        if trace.plan_pending:
            why = plots.pending_why(trace).replace("<i>", "*").replace("</i>", "*")
            return (f"{trace.prompt_length} prompt tokens. {why[0].upper()}{why[1:]}: the pairing appears once the "
                    f"prompt has run.{found} Press Run to generate.")
        if not trace.cutoffs:
            return f"{trace.prompt_length} prompt tokens; no cutoff, so the merged side runs the base model.{found}"
        after = ", ".join(f"{len(g)} after layer {c}" for g, c in zip(trace.groups, trace.cutoffs))
        return f"{trace.prompt_length} prompt tokens → {after}.{found} Press Run to generate."

    # The generation -------------------------------------------------------------------------------------------------

    def generate(self, prompt, model, chat, cutoff, more_cutoffs, keep_start, keep_end, method, positions, mode,
                 max_new_tokens, temperature, seed, ratio=1.0, choice="consecutive", proportional=False,
                 attention_window=DEFAULT_SETTINGS.attention_window,
                 attention_keep=DEFAULT_SETTINGS.attention_keep, ratios="", view=None):
        """Stream the base and the merged generation side by side, token by token, with the four views.

        Every input is checked before any model work; the model must be the one loaded (or loading): a generation
        never switches the shared model. Each view is serialised when it changes and yielded as is in between, so
        the stream carries it once (the pairing plot, heavy for a long prompt, once per run).
        """
        skip = gr.skip()
        view = view if view is not None else PageView()
        try:
            request = parse_request(prompt, model, chat, cutoff, more_cutoffs, keep_start, keep_end, method,
                                    positions, mode, max_new_tokens, temperature, seed, ratio, choice, proportional,
                                    attention_window, attention_keep, ratios)
            for message in self.holder.following(request.model):
                yield (skip,) * 9 + (f"**Loading…** {escape(message)}",)
            engine = self.holder.engine
            plan = self.plan_trace(request)  # validates everything before the first step
        except Exception as error:  # noqa: BLE001
            raise page_error(error) from None

        def token_text(token: int) -> str:
            return engine.tokenizer.decode([token])

        view.base = view.merged = None
        view.sampling, view.token_text = request.sampling, token_text
        pairing = lengths = latency = kv = skip
        yield ("", "", "", "", PENDING_COMPARISON, skip, plot_data(plots.length_figure(plan)), skip, skip,
               "**Prefill**: running the prompt through both models…")
        base = merged = None
        steps = 0
        pairs = generation_steps(request)
        try:
            for base, merged in pairs:
                view.base, view.merged = base, merged
                steps += 1
                if steps == 1:  # the prompt has run: the pair cosines (and a `similar` plan) are known
                    pairing = plot_data(self._pairing_figure(merged, view))
                    lengths = plot_data(plots.length_figure(merged, base))
                    view.pairing = merged
                if steps == 1 or steps % PLOT_EVERY == 0:
                    latency = plot_data(plots.latency_figure(base, merged))
                    kv = plot_data(plots.kv_figure(base, merged))
                yield (base.text, merged.text, panel_markdown(base), panel_markdown(merged, base),
                       PENDING_COMPARISON, pairing, lengths, latency, kv,
                       status_markdown(base, merged, request.sampling))
        except Exception as error:  # noqa: BLE001
            raise page_error(error) from None
        finally:
            pairs.close()  # Stop, or a client gone: both runs end here, at once
            release_memory()
        if base is None:
            return
        # The runs mark themselves finished only once exhausted, after the last step was shown: show the end, with
        # every view final, so that an API client's last message holds the whole picture.
        yield (base.text, merged.text, panel_markdown(base), panel_markdown(merged, base),
               comparison_markdown(base, merged, token_text), pairing, lengths,
               plot_data(plots.latency_figure(base, merged)), plot_data(plots.kv_figure(base, merged)),
               status_markdown(base, merged, request.sampling))

    def stopped(self, view=None):
        """After Stop has cancelled a generation: finalise every panel at the token where the runs stopped."""
        skip = gr.skip()
        if view is None or view.sampling is None:
            return skip, skip, skip, skip, skip, "**Stopped**: nothing was generating."
        # A step already under way when Stop came finishes on its own; wait for it, so the panels show its token.
        if self.holder.device_lock.acquire(timeout=30):
            self.holder.device_lock.release()
        base, merged = view.base, view.merged
        if base is None or merged is None:
            return (skip, skip, "**Stopped at token 0**: the prompt was still running, nothing to compare.", skip,
                    skip, "**Stopped** during the prefill: no tokens were generated.")
        if base.finished and merged.finished:  # it had ended before Stop: its "Done" stands
            return skip, skip, skip, skip, skip, skip
        return (panel_markdown(base, stopped=True), panel_markdown(merged, base, stopped=True),
                comparison_markdown(base, merged, view.token_text, stopped=True),
                plots.latency_figure(base, merged), plots.kv_figure(base, merged),
                status_markdown(base, merged, view.sampling, stopped=True))


# --------------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------------

INTRO = """
# slerpviz · token merging with SLERP, live
At the **cutoff** layer, the hidden states of neighbouring prompt tokens are paired and each pair is replaced by its
SLERP, so every later layer runs on a sequence about half as long. The **base** model (left) and the **merged** one
(right) generate at the same time, step by step; each is timed on its own steps only.
"""

NOTES = """
**SLERP vs LERP at t = 0.5.** SLERP of two vectors at t = 0.5 points in exactly the same direction as their mean
(LERP); it only rescales it, by 1 / cos(θ/2) where θ is the angle between them. So the two methods differ only in
the norm of the merged state. **slerp-dir** keeps SLERP's direction with the average of the two norms, so it undoes
that inflation. **seed-2024** reproduces the April 2024 article's code, which normalised whole tensors
instead of single vectors: θ comes out near 90° for every pair and the result is about (a + b)/√2.

**Positions.** *mean*: a slot sits at the mean position of its tokens; *first*: at its first token's; *renumber*:
slots are renumbered 0, 1, 2, … (the article). **Modes.** *cached*: the prompt is merged once at prefill and later
tokens decode against a KV cache per layer (shorter after the cutoff). *recompute*: no cache; every step re-runs and
re-merges the whole sequence (the article's semantics, slower).

**More merge settings.** *Merge ratio* merges only that share of the eligible pairs (*ratio per cutoff* gives one
for each cutoff); *pair choice* picks them: the first ones (*consecutive*), spread evenly (*uniform*), the most
similar neighbours at the cutoff (*similar*), or the pairs the prompt attends to least (*attention*: each token is
scored by the attention the last *W* prompt tokens pay it at the cutoff layer, and the *keep most attended* budget
never merges). *similar* and *attention* are planned from the hidden states during the prefill, so their pairing
plot appears once the prompt has run; with *attention* the prompt tokens are then coloured by the attention they
received. A prompt holding a pass key ("The pass key is 71152 …") gets it marked in the pairing plot, and the
comparison says whether each side answered it.
*Proportional attention* raises each merged key's attention logit by log(tokens it holds), so a slot standing for two
tokens draws about as much attention as the two did.

**Protected spans.** keep-start / keep-end tokens are never merged (for example the chat template's system header);
the first and last prompt tokens always stay alone. **Timing.** Time to first token includes the prefill; tokens per
second counts the decode steps; on a GPU each step is synchronised before its clock stops.
"""

CSS = """
.panel-base h3 { color: #4C78A8; }
.panel-merged h3 { color: #F58518; }
.generation textarea { font-size: 0.95rem; line-height: 1.45; }
/* A slider's track keeps a 112px minimum width, so in a narrow column it pushes the maximum's label ("512") out of
   its box, clipped to "51"; letting the track shrink keeps every label whole. */
.slider_input_container input[type=range] { min-width: 0; }
"""


# --------------------------------------------------------------------------------------------------------------------
# Examples and presets
# --------------------------------------------------------------------------------------------------------------------

# The controls an example fills in, by name, in the order the click handler returns them.
EXAMPLE_FIELDS = ("prompt", "chat", "mode", "max_new_tokens")
MERGE_FIELDS = ("cutoff", "more_cutoffs", "keep_start", "keep_end", "method", "positions", "ratio", "ratios", "choice",
                "proportional", "attention_window", "attention_keep")


@dataclass(frozen=True)
class Example:
    """A clickable example. `settings` is the merged side's MergeSettings, or a preset's name: a preset is read at
    click time for the loaded model's depth, so it always says what slerpviz.presets says now."""

    label: str
    prompt: str
    settings: MergeSettings | str
    max_new_tokens: int = 48
    mode: str = "cached"
    chat: bool = True

    def merge_settings(self, num_layers: int) -> MergeSettings:
        if isinstance(self.settings, str):
            return presets.preset(self.settings, num_layers)
        return self.settings


def merge_controls(settings: MergeSettings, num_layers: int) -> dict:
    """A MergeSettings as the values of the page's merge controls (MERGE_FIELDS): the first cutoff on the slider, the
    rest as further cutoffs; one ratio on the slider, or per-cutoff ratios as text when they differ."""
    cutoffs = sorted(settings.cutoffs) or [num_layers]  # no cutoff: merge after the last layer, i.e. never
    ratios = settings.ratio if isinstance(settings.ratio, tuple) else (settings.ratio,)
    uniform = len(set(ratios)) == 1
    return dict(
        cutoff=cutoffs[0], more_cutoffs=list(cutoffs[1:]), keep_start=settings.keep_start,
        keep_end=settings.keep_end, method=settings.method, positions=settings.positions, ratio=float(ratios[0]),
        ratios="" if uniform else ", ".join(f"{r:g}" for r in ratios), choice=settings.choice,
        proportional=settings.proportional, attention_window=settings.attention_window,
        attention_keep=settings.attention_keep,
    )


def example_values(example: Example, num_layers: int) -> dict:
    """Every control an example fills in (EXAMPLE_FIELDS + MERGE_FIELDS), by name."""
    return dict(prompt=example.prompt, chat=example.chat, mode=example.mode, max_new_tokens=example.max_new_tokens,
                **merge_controls(example.merge_settings(num_layers), num_layers))


def preset_note() -> str:
    recommended = presets.PRESETS["recommended"]
    return (f"**Recommended preset** (`slerpviz.presets`): {escape(recommended.description)}. The button fills in "
            "its merge settings for the loaded model.")


def examples() -> list[Example]:
    def at(cutoff: int, **changes) -> MergeSettings:
        return MergeSettings(cutoffs=(cutoff,), **changes)

    sky = "Explain in three short sentences why the sky is blue."
    chosen = [
        Example("Why is the sky blue? (cutoff 15)", sky, at(15)),
        Example("Haiku (cutoff 10)", "Write a haiku about a lighthouse in winter.", at(10), 32),
        Example("Paperclips, lerp (cutoff 20)", "List five uses of a paperclip, one per line.", at(20, method="lerp")),
        Example("Article's seed-2024 code, recompute", "What is the capital of France? Answer in one word.",
                at(8, method="seed-2024", positions="renumber"), 12, mode="recompute"),
        Example("Why is the sky blue? Recommended preset", sky, "recommended"),
    ]
    document = ASSETS / "examples" / "long_document.txt"
    if document.exists():
        text = document.read_text(encoding="utf-8").strip()
        chosen.append(Example("Long report (~1,500 tokens): the speed difference shows",
                              f"Summarise the following report in three sentences.\n\n{text}", at(4, keep_end=8), 16))
    passkey = ASSETS / "examples" / "passkey.txt"
    if passkey.exists():
        # Raw text ending in "The pass key is": the model completes it best without the chat template.
        chosen.append(Example("Find the pass key (~1,500 tokens), recommended preset",
                              passkey.read_text(encoding="utf-8").strip(), "recommended", 10, chat=False))
    return chosen


def build_app(model: str | None = None, preload: bool = True) -> gr.Blocks:
    """The whole page. `model` picks the dropdown's default; `preload` starts loading it before anyone asks.

    On ZeroGPU the model was loaded at import (`load_for_zero_gpu`); the page shows it and cannot switch it.
    """
    zero_gpu = on_zero_gpu()
    model = ENGINES.name if zero_gpu and ENGINES.name else model or default_model()
    check_allowed(model)
    if preload and not zero_gpu:
        ENGINES.preload(model)
    page = Page()
    layers = page._num_layers()

    with gr.Blocks(title="slerpviz: token merging with SLERP", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=6, max_lines=14, elem_id="prompt",
                                    placeholder="Type a prompt, or click an example below")
                with gr.Row():
                    model_box = gr.Dropdown(
                        [model] if zero_gpu else list(ALLOWED_MODELS), value=model, label="Model", scale=3,
                        interactive=not zero_gpu, elem_id="model",
                        info="Loaded when the Space starts (ZeroGPU)." if zero_gpu else
                        "One model on the device at a time, shared by everyone; changing it waits for running "
                        "generations, then reloads.")
                    chat = gr.Checkbox(value=True, label="Chat template", scale=1, elem_id="chat",
                                       info="Wrap the prompt as a user turn (instruct models).")
                with gr.Row():
                    run_button = gr.Button("Run", variant="primary", elem_id="run")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                status = gr.Markdown("**Starting…**", elem_id="status", label="Status")
                examples_place = gr.Column()  # filled below, once the controls the examples set exist
            with gr.Column(scale=2):
                cutoff = gr.Slider(0, layers, value=min(15, layers), step=1, precision=0, label="Cutoff layer",
                                   info="Merge before this decoder layer (0 = at the embeddings).", elem_id="cutoff")
                more_cutoffs = gr.Dropdown(list(range(layers + 1)), value=[], multiselect=True,
                                           allow_custom_value=True,  # the engine checks the range, per model
                                           label="Further cutoffs (optional)",
                                           info="Merge again at these layers: each stage halves the sequence.")
                with gr.Row():
                    keep_start = gr.Slider(0, 2048, value=0, step=1, precision=0, label="Keep start",
                                           info="Protected tokens at the start.", elem_id="keep-start")
                    keep_end = gr.Slider(0, 2048, value=0, step=1, precision=0, label="Keep end",
                                         info="Protected tokens at the end.", elem_id="keep-end")
                with gr.Row():
                    method = gr.Radio(list(METHODS), value="slerp", label="Method")
                    positions = gr.Radio(list(POSITION_MODES), value="mean", label="Positions")
                mode = gr.Radio(list(MODES), value="cached", label="Mode")
                with gr.Group():
                    gr.Markdown(preset_note(), elem_id="preset-note", padding=True)
                    preset_button = gr.Button("Use the recommended preset", size="sm", elem_id="preset")
                with gr.Accordion("More merge settings: ratio, pair choice, attention, proportional attention",
                                  open=False):
                    ratio = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="Merge ratio", elem_id="ratio",
                                      info="Share of the eligible pairs merged at each cutoff (1 = all).")
                    ratios = gr.Textbox(value="", label="Ratio per cutoff (optional)", elem_id="ratios",
                                        placeholder="e.g. 0.5, 1",
                                        info="One ratio per cutoff, in layer order; overrides the slider.")
                    choice = gr.Radio(list(CHOICES), value="consecutive", label="Pair choice", elem_id="choice",
                                      info="Which pairs, when the ratio is below 1: the first ones, spread evenly, "
                                           "the most similar at the cutoff, or the least attended there.")
                    with gr.Row(visible=False, elem_id="attention-controls") as attention_controls:
                        attention_window = gr.Number(
                            value=DEFAULT_SETTINGS.attention_window, precision=0, minimum=1,
                            label="Attention window W", elem_id="attention-window",
                            info="Tokens are scored by the attention the last W prompt tokens pay them at the cutoff.")
                        attention_keep = gr.Number(
                            value=DEFAULT_SETTINGS.attention_keep, precision=0, minimum=0,
                            label="Keep most attended", elem_id="attention-keep",
                            info="This many of the most-attended tokens never merge.")
                    proportional = gr.Checkbox(value=False, label="Proportional attention",
                                               info="Add log(tokens held) to a merged key's attention logit.")
                with gr.Row():
                    max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=48, step=1, precision=0,
                                               label="Max new tokens", elem_id="max-new-tokens")
                    temperature = gr.Slider(0.0, MAX_TEMPERATURE, value=0.0, step=0.05, label="Temperature",
                                            info="0 = greedy")
                    seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)

        with examples_place:
            # Labels only: a click asks the page for the values, so a preset is read for the model loaded then.
            example_list = gr.Dataset(components=[prompt], samples=[[e.label] for e in page.examples],
                                      sample_labels=[e.label for e in page.examples], type="index",
                                      label="Examples (click to fill in, then Run)", elem_id="examples")

        with gr.Row(equal_height=True):
            with gr.Column(elem_classes="panel-base"):
                gr.Markdown("### Base model")
                base_text = gr.Textbox(label="Base output", lines=8, max_lines=16, interactive=False,
                                       elem_id="base-text", elem_classes="generation", buttons=["copy"])
                base_stats = gr.Markdown(elem_id="base-stats", label="Base figures")
            with gr.Column(elem_classes="panel-merged"):
                gr.Markdown("### Merged model")
                merged_text = gr.Textbox(label="Merged output", lines=8, max_lines=16, interactive=False,
                                         elem_id="merged-text", elem_classes="generation", buttons=["copy"])
                merged_stats = gr.Markdown(elem_id="merged-stats", label="Merged figures")
        comparison = gr.Markdown(elem_id="comparison", label="Comparison")

        pairing = gr.Plot(label="Token pairing", elem_id="pairing-plot", show_label=False)
        labels_from = gr.Number(
            value=0, precision=0, minimum=0, label="Token labels from", elem_id="labels-from",
            info=f"A long prompt's pairing plot labels {plots.DETAIL_TOKENS} tokens from here (with hover text and "
                 "links); the rest shows as markers coloured by pair cosine.")
        lengths = gr.Plot(label="Sequence length and attention cost per layer", elem_id="length-plot",
                          show_label=False)
        with gr.Row():
            latency = gr.Plot(label="Per-token latency", elem_id="latency-plot", show_label=False)
            kv = gr.Plot(label="KV cache per layer", elem_id="kv-plot", show_label=False)
        with gr.Accordion("Notes: SLERP vs LERP, positions, modes, timing", open=False):
            gr.Markdown(NOTES)

        # What this page shows, per session: Stop finalises the panels from it; previews skip re-sending a plot.
        view = gr.State(lambda: PageView())  # a fresh one per session

        # Later additions go at the end, so that positional API calls written for fewer inputs keep working.
        inputs = [prompt, model_box, chat, cutoff, more_cutoffs, keep_start, keep_end, method, positions, mode,
                  max_new_tokens, temperature, seed, ratio, choice, proportional, attention_window, attention_keep,
                  ratios]
        outputs = list(Outputs(base_text, merged_text, base_stats, merged_stats, comparison, pairing, lengths,
                               latency, kv, status))

        # preprocess=False: the callbacks get the values as sent and check each one themselves (parse_request), so
        # a bad value from any client gets a message naming the field, never a silent rounding or Gradio's generic
        # error. Planning only tokenises, so it never waits behind a generation; the generation queues for the
        # device. Neither ever starts a model load.
        planned = run_button.click(page.plan, [*inputs, view], [pairing, lengths, status], api_name="plan",
                                   preprocess=False, concurrency_limit=None, show_progress="hidden")
        generating = planned.success(page.generate, [*inputs, view], outputs, api_name="generate",
                                     preprocess=False, concurrency_id="device", concurrency_limit=1,
                                     show_progress_on=[base_text, merged_text])
        # Cancel first, then finalise: panels written with the cancel could be overwritten by the last message the
        # cancelled generation had already sent.
        stop_button.click(None, None, None, cancels=[generating], api_visibility="private", queue=False).then(
            page.stopped, [view], [base_stats, merged_stats, comparison, latency, kv, status],
            api_visibility="private", queue=False)

        preview = dict(fn=page.preview, inputs=[*inputs, view], outputs=[pairing, lengths, status],
                       preprocess=False, api_visibility="private", concurrency_limit=None, show_progress="hidden",
                       trigger_mode="always_last")
        prompt.blur(**preview)
        controls = dict(prompt=prompt, chat=chat, mode=mode, max_new_tokens=max_new_tokens, cutoff=cutoff,
                        more_cutoffs=more_cutoffs, keep_start=keep_start, keep_end=keep_end, method=method,
                        positions=positions, ratio=ratio, ratios=ratios, choice=choice, proportional=proportional,
                        attention_window=attention_window, attention_keep=attention_keep)
        example_list.click(page.fill_example, [example_list], [controls[f] for f in (*EXAMPLE_FIELDS, *MERGE_FIELDS)],
                           api_visibility="private", queue=False, show_progress="hidden").then(**preview)
        preset_button.click(page.fill_preset, None, [controls[f] for f in MERGE_FIELDS], api_visibility="private",
                            queue=False, show_progress="hidden").then(**preview)
        for slider in (cutoff, keep_start, keep_end, ratio):
            slider.release(**preview)
        for control in (more_cutoffs, chat, choice):
            control.change(**preview)
        for control in (ratios, attention_window, attention_keep):
            control.submit(**preview)
        # The attention window and budget mean something for the `attention` choice only.
        choice.change(lambda chosen: gr.update(visible=chosen == "attention"), [choice], [attention_controls],
                      api_visibility="private", queue=False, show_progress="hidden")

        labels_from.submit(page.pairing_window, [labels_from, view], [pairing], api_visibility="private",
                           concurrency_limit=None, show_progress="hidden", trigger_mode="always_last")

        # Switching the shared model is the page's own control, not an API: private (no client library reaches it),
        # and in the device's queue, so it waits for running generations and none starts during it.
        layer_controls = [cutoff, more_cutoffs]
        model_box.input(page.load_model, [model_box, cutoff, more_cutoffs], [status, model_box, *layer_controls],
                        api_visibility="private", concurrency_id="device", concurrency_limit=1)
        demo.load(page.on_open, [model_box, cutoff, more_cutoffs], [status, model_box, *layer_controls],
                  api_visibility="private", concurrency_limit=None)

    demo.queue(max_size=int(os.environ.get("SLERPVIZ_QUEUE_SIZE", QUEUE_SIZE)), default_concurrency_limit=1)
    return demo


def serve(demo: gr.Blocks, host: str | None = None, port: int | None = None, share: bool = False, **options):
    """Launch the page with its theme and styles (gradio 6 takes those at launch)."""
    options.setdefault("max_file_size", MAX_FILE_SIZE)
    return demo.launch(server_name=host, server_port=port, share=share, css=CSS, theme=gr.themes.Soft(),
                       footer_links=["api"], **options)
