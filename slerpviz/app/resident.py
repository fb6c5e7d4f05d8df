"""The resident model: the one model the app serves on this device, how it is switched, and a request's work on it.

One model lives on the device at a time (`RESIDENT`); generations and model swaps queue for it one at a time. Loading
is slerpviz.models' (fetching a hub model's files, placing it on the device); this module only holds the loaded
engine and switches it. On a ZeroGPU Space the model is loaded at import (`models.load_for_zero_gpu`, from app.py)
and the GPU exists only inside `gpu_task` functions, so the device work of a request (`generation_steps`) is the one
function under that decorator.

Nothing here knows about Gradio: the page's callbacks (slerpviz.app.callbacks) drive it.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterator

import torch

from ..engine import MergeSettings, MergingEngine, Trace, interleave
from .form import Request
from .transfer import ChangeSender, TraceChange, apply_change
from ..models import EMBEDDED, check_allowed, fetch_weights, load_on_device
from ..presets import PRESETS, preset
from ..settings import check_prefill

log = logging.getLogger(__name__)

GPU_MODEL = "mistralai/Mistral-7B-Instruct-v0.2"
GPU_MODEL_MEMORY = 20 * 2**30  # bf16 weights (~14.5 GB) plus room for the caches of both generations

try:  # On a ZeroGPU Space the GPU is attached only inside functions under this decorator; elsewhere a no-op.
    import spaces

    # ZeroGPU calls `duration` with the generation's own arguments; gpu_seconds is defined below, hence the lambda.
    gpu_task = spaces.GPU(duration=lambda *args, **kwargs: gpu_seconds(*args, **kwargs))
except ImportError:  # pragma: no cover - depends on the machine
    def gpu_task(function):
        return function


def prefill_warm_ups(engine: MergingEngine) -> list[MergeSettings]:
    """What a compiled prefill is warmed with before the page serves: base, every preset, and proportional attention
    (its float mask is one more kind of layer call) where the model takes it."""
    settings = [MergeSettings(), *(preset(name, engine.num_layers) for name in PRESETS)]
    proportional = MergeSettings(cutoffs=(engine.num_layers // 2,), proportional=True)
    try:
        engine.validate(64, proportional)
    except ValueError:  # sliding-window or flash attention: the page refuses it, so it never runs
        return settings
    return [*settings, proportional]


def chosen_prefill() -> str:
    """$SLERPVIZ_PREFILL: eager (the default) or compiled, how both sides run the prompt's layers. Compiling costs
    seconds per model on a CPU and more on a GPU, once per process; on ZeroGPU every call meets a fresh worker, so
    the prompt's layers stay eager there."""
    try:
        chosen = check_prefill(os.environ.get("SLERPVIZ_PREFILL", "eager"))
    except ValueError as error:
        raise ValueError(f"$SLERPVIZ_PREFILL: {error}") from None
    return "eager" if on_zero_gpu() else chosen


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


# The page's model menu reaches the server as a plain request that any script can send (a private event is only left
# out of the API docs and the client libraries), so the menu's switch is admitted only to an allowed model, while no
# other load is under way, and at most once per SWITCH_INTERVAL seconds in this process.
SWITCH_INTERVAL = float(os.environ.get("SLERPVIZ_SWITCH_INTERVAL", 30))


class SwitchRefused(ValueError):
    """A model switch that is not started now; the message says why and when to try again."""


class ResidentModel:
    """The one model (its engine) on this device.

    A load runs in a background thread so callers can show its progress instead of a frozen page; callers that
    arrive while a load is under way follow it rather than start another. Only `switch` starts a load (the page's
    model control, and a page opening on an empty device); generations and plans only follow one.

    A switch never leaves the device empty: a hub model's files are fetched before the resident model is freed (a
    GPU holds one 7B model, so there it is freed before the new one loads, under `device_lock` so never during a
    step), and if the new model still fails, the previous one is loaded back. `device_lock` is held around every
    forward step, so at most one step runs on the device at any moment, whatever the queue does on a cancel.
    """

    def __init__(self, loader: Callable[..., MergingEngine] | None = None,
                 fetcher: Callable[[str, Callable[[str], None]], None] | None = None, free_first: bool | None = None,
                 switch_interval: float = SWITCH_INTERVAL, clock: Callable[[], float] = time.monotonic):
        self._loader = loader or load_on_device
        self._fetcher = fetcher or fetch_weights
        self._free_first = free_first  # None: where there is a GPU
        self.switch_interval, self._clock = switch_interval, clock
        self._switched_at: float | None = None  # when the model menu's last admitted switch started
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
            yield from self._follow(thread, target, name, poll)

    def admit_switch(self, name: str) -> None:
        """Admit a switch the page's model menu asks for, or raise SwitchRefused: `name` must be on the allow-list, no
        other model may be loading, and the last admitted switch must be `switch_interval` seconds old. Asking for
        the model that is loaded, or loading, starts nothing and is always admitted; asking again, within the interval,
        for the model whose load has just failed raises that failure again."""
        check_allowed(name)
        with self._state:
            if self._loading_locked():
                if self._target == name:
                    return
                raise SwitchRefused(f"{self._target} is loading for another page; try again once it is ready.")
            if self.name == name and self.engine is not None:
                return
            now = self._clock()
            since = None if self._switched_at is None else now - self._switched_at
            if since is not None and since < self.switch_interval:
                failed = self._outcome
                if failed is not None and failed[0] == name and failed[1] is not None:
                    # The switch asked for again (a second click, another page) is the one that has just failed:
                    # its reason is the answer, not "try again in N s" for something that would fail again.
                    raise failed[1]
                raise SwitchRefused(f"the shared model switches at most once every {self.switch_interval:g} s; try "
                                    f"again in {math.ceil(self.switch_interval - since)} s.")
            self._switched_at = now

    def following(self, name: str, poll: float = 0.25) -> Iterator[str]:
        """Wait until `name` is loaded, following a load under way; never start one. Raise ValueError when `name`
        is neither loaded nor loading: switching is the page's model control's job alone.

        Where a switch keeps the resident model until the new one is ready (no GPU to free), requests for the
        resident model go on meanwhile: a slow or stuck load of another model does not stop them."""
        check_allowed(name)
        while True:
            with self._state:
                loading = self._loading_locked()
                resident = self.name == name and self.engine is not None
                if resident and (not loading or not self._frees_first()):
                    return
                thread, target = self._thread, self._target
            if not loading:
                serving = f"the app serves {self.name}" if self.name else "no model is loaded yet"
                raise ValueError(f"model {name!r} is not loaded: {serving}. Only the page's Model menu switches "
                                 "models; choose it there, or ask for the model that is loaded.")
            yield from self._follow(thread, target, name, poll)

    def ensure(self, name: str) -> MergingEngine:
        for _ in self.switch(name):
            pass
        return self.engine

    def preload(self, name: str) -> None:
        """Start loading in the background now (at startup), so the first visitor finds the model ready sooner."""
        with self._state:
            if self.name != name and not self._loading_locked():
                self._start(name)

    def _frees_first(self) -> bool:
        return torch.cuda.is_available() if self._free_first is None else self._free_first

    def _loading_locked(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _wait(self, thread: threading.Thread, target: str, poll: float) -> Iterator[str]:
        while thread.is_alive():
            yield self.message or f"Loading {target}"
            thread.join(poll)

    def _follow(self, thread: threading.Thread, target: str, name: str, poll: float) -> Iterator[str]:
        """Wait out the load under way; raise its error if it was `name`'s load and it failed."""
        yield from self._wait(thread, target, poll)
        with self._state:
            outcome = self._outcome
        if outcome is not None and outcome[0] == name and outcome[1] is not None:
            raise outcome[1]

    def _start(self, name: str) -> None:
        self._target, self._outcome, self.message = name, None, f"Loading {name}"
        self._thread = threading.Thread(target=self._load, args=(name,), name=f"load {name}", daemon=True)
        self._thread.start()

    def _load(self, name: str) -> None:
        def progress(message: str) -> None:
            self.message = message

        previous, freed = self.name, False
        try:
            compiled = chosen_prefill() == "compiled"  # a bad value is refused before anything is fetched or freed
            self._fetcher(name, progress)
            if self._frees_first() and self.engine is not None:
                # Two 7B models do not fit on one GPU: free the old one, but never in the middle of a step.
                with self.device_lock, self._state:
                    self.engine, self.name, freed = None, None, True
                release_memory()
            engine = self._loader(name, progress=progress)
            progress(f"Warming up {name}")
            engine.warm_up()  # one-time setup now, so the first timed comparison is not charged for it
            if compiled:
                progress(f"Compiling {name}'s prefill (once per model)")
                # The layers alone: one graph serves every setting, where a merge compiles for each new setting, and
                # a visitor's first run of one would be charged for it.
                try:
                    engine.compile_prefill(merges=False)
                    engine.warm_up_prefill(prefill_warm_ups(engine))
                except Exception:  # noqa: BLE001 - no C compiler, an inductor bug: the page serves, uncompiled
                    log.exception("compiling %s's prefill failed; its prompts run eagerly", name)
                    engine.uncompile_prefill()
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


RESIDENT = ResidentModel()


# --------------------------------------------------------------------------------------------------------------------
# A request's work on the model
# --------------------------------------------------------------------------------------------------------------------


def plan_trace(engine: MergingEngine, request: Request) -> Trace:
    """The merged side's plan for a request, without generating: tokenise, check everything that depends on the
    model (a cutoff past its depth, spans longer than the prompt, the context), then plan."""
    ids = engine.encode(request.prompt, request.chat)
    engine.validate(ids.shape[-1], request.settings, request.sampling, request.mode)
    return engine.new_trace(ids, request.settings, request.mode)


# How long a request may hold a ZeroGPU slice, from issue 23's H200 timings of Mistral-7B, with room to spare: the
# slice's setup, each prompt token's prefill and each new token's decode step, on both sides. Asking for less than
# the 60 s default puts a visitor earlier in ZeroGPU's queue; asking for more than a request needs holds the slice.
GPU_SETUP_S = 10.0
GPU_PREFILL_S_PER_TOKEN = 2e-4  # 35 µs measured (16,384 tokens in 0.57 s)
GPU_DECODE_S_PER_TOKEN = 0.06  # 28-48 ms measured
GPU_SECONDS = (20, 120)  # ZeroGPU's own bounds for a call, as far as slerpviz asks
CHARACTERS_PER_TOKEN = 3  # fewer than most tokenizers average, so the estimate errs long


def gpu_seconds(request: Request, stop: threading.Event | None = None) -> int:
    """ZeroGPU's `duration` for one request (it calls this with the generation's own arguments): sized by the
    prompt's length and the new tokens asked for, on both sides, rounded up to 10 s within GPU_SECONDS."""
    prompt_tokens = len(request.prompt) / CHARACTERS_PER_TOKEN + 64  # the chat template's tokens too
    seconds = GPU_SETUP_S + 2 * (prompt_tokens * GPU_PREFILL_S_PER_TOKEN
                                 + request.sampling.max_new_tokens * GPU_DECODE_S_PER_TOKEN)
    low, high = GPU_SECONDS
    return int(min(high, max(low, 10 * math.ceil(seconds / 10))))


_WARMED: set[int] = set()  # engines this process has warmed up (by id)


@gpu_task
def generation_steps(request: Request, stop: threading.Event | None = None
                     ) -> Iterator[tuple[TraceChange, TraceChange]]:
    """The GPU part of a request: both generations, yielding what each side's trace gained (slerpviz.app.transfer)
    after every step pair, and once more when both are done; setting `stop` ends the step under way at its next
    layer (not on ZeroGPU, where arguments are pickled). `generation_traces` turns the changes back into traces.

    It reaches the model through the module's RESIDENT, not an argument: on ZeroGPU the arguments and what it yields
    are pickled across to a GPU worker process, and plain settings and changes pickle, a model and its locks do not.
    """
    resident = RESIDENT
    engine = resident.engine
    if on_zero_gpu() and id(engine) not in _WARMED:
        # A GPU worker meets the model fresh: pay its one-time setup before the timed steps, once in this process.
        engine.warm_up()
        _WARMED.add(id(engine))
    ids = engine.encode(request.prompt, request.chat)
    base = engine.start(ids, MergeSettings(), request.sampling, request.mode, stop)
    merged = engine.start(ids, request.settings, request.sampling, request.mode, stop)
    senders = ChangeSender(), ChangeSender()
    # A coin a round decides which side steps first: the page's drawing between rounds falls on either by chance.
    for _ in interleave(base, merged, lock=resident.device_lock, order=random.Random()):
        yield senders[0].change(base.trace), senders[1].change(merged.trace)
    yield senders[0].change(base.trace), senders[1].change(merged.trace)  # the runs have marked themselves finished


def generation_traces(request: Request, stop: threading.Event | None = None) -> Iterator[tuple[Trace, Trace]]:
    """`generation_steps` on the page's side: (base trace, merged trace) after every step pair, rebuilt from the
    changes the GPU sends. Closing it closes the generation (Stop, or a client gone)."""
    changes = generation_steps(request, stop)
    base = merged = None
    try:
        for base_change, merged_change in changes:
            base, merged = apply_change(base, base_change), apply_change(merged, merged_change)
            yield base, merged
    finally:
        changes.close()

