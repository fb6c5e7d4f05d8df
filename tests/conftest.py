"""Shared fixtures: tiny models of each supported family built from configs, and the real embedded model."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
    Qwen2ForCausalLM,
)

from slerpviz.engine import MergingEngine

# One torch thread unless told otherwise: on a 2-core machine shared with other jobs, two threads waiting on a busy
# core stall each other (a 77-token prefill of the embedded model: 0.3 s on one thread, 3 to 7 s on two), and on an
# idle one the tests' short prompts gain little from a second thread. SLERPVIZ_TEST_THREADS=0 keeps torch's choice.
_threads = int(os.environ.get("SLERPVIZ_TEST_THREADS", "1"))
if _threads > 0:
    torch.set_num_threads(_threads)

VOCAB = 96
WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
FAMILIES = {
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
}


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over w0..wN, enough for encode/decode/EOS in engine tests."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )


def tiny_model(family: str, attn: str = "sdpa", seed: int = 0):
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_class(**TINY, **extra, attn_implementation=attn)
    return model_class(config).eval()


def tiny_engine(family: str, attn: str = "sdpa") -> MergingEngine:
    return MergingEngine(tiny_model(family, attn), word_tokenizer())


def random_ids(length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, length), generator=generator)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def engine(request) -> MergingEngine:
    return tiny_engine(request.param)


@pytest.fixture
def fresh_dynamo():
    """torch.compile's graphs forgotten before and after the test: a function keeps a bounded number of them per
    process, and a test that counts them must not count other tests'."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def embedded():
    from slerpviz.models import EMBEDDED, load

    return load(EMBEDDED)


@contextlib.contextmanager
def launched_app(**environment: str):
    """The app launched on a free loopback port with the embedded model loaded, its settings read from the
    environment with these variables set while it is built: its URL."""
    import socket

    from slerpviz.app import layout
    from slerpviz.app.resident import RESIDENT
    from slerpviz.models import EMBEDDED

    RESIDENT.ensure(EMBEDDED)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        demo = layout.build_app(EMBEDDED, preload=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    layout.serve(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def app_url():
    """The app launched on a free loopback port for this module, with the embedded model loaded."""
    with launched_app() as url:
        yield url


@pytest.fixture(scope="module")
def app_engine():
    """The engine the app's resident model serves (the embedded model), as the page's callbacks see it."""
    from slerpviz.app.resident import RESIDENT
    from slerpviz.models import EMBEDDED

    return RESIDENT.ensure(EMBEDDED)


@pytest.fixture(scope="module")
def page(app_engine):
    """The page's callbacks, called directly, with the embedded model loaded."""
    from slerpviz.app import callbacks

    return callbacks.Page()


@pytest.fixture(scope="module")
def client(app_url):
    """A gradio_client on the launched app."""
    from gradio_client import Client

    return Client(app_url, verbose=False, analytics_enabled=False, download_files=False)


# The page's inputs by name, in the order the callbacks and the API take them (slerpviz.app.form.FIELDS).
PAGE_PROMPT = "Why is the sky blue? One sentence."


def page_defaults(**changes) -> dict:
    """The page's fields for a short consecutive merge at cutoff 15 of the embedded model, with `changes`."""
    from slerpviz.models import EMBEDDED

    return {**dict(prompt=PAGE_PROMPT, model=EMBEDDED, chat=True, cutoff=15, more_cutoffs=[], keep_start=0,
                   keep_end=0, method="slerp", positions="mean", mode="cached", max_new_tokens=4, temperature=0.0,
                   seed=0, ratio=1.0, choice="consecutive", proportional=False, attention_window=32,
                   attention_keep=0, ratios="", attention_reach=0, attention_keep_share=0.0, keep_recent=0),
            **changes}
