"""The static decoder (slerpviz.decode) against the engine's dynamic decode: the same tokens and logits for the base
model and every merge, a step that traces whole under torch.compile, and no host work inside a step."""

import copy
import threading
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import DynamicCache, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import DynamicSlidingWindowLayer

from conftest import TINY, random_ids, tiny_engine, word_tokenizer
from slerpviz import decode
from slerpviz.engine import Interrupted, MergeSettings, MergingEngine, Sampling, Session, interleave

SETTINGS = [
    MergeSettings(),
    MergeSettings(cutoffs=(3,)),
    MergeSettings(cutoffs=(0,), keep_start=2, keep_end=3, positions="first", proportional=True),
    MergeSettings(cutoffs=(2, 4), choice="uniform", ratio=0.5, proportional=True),
    MergeSettings(cutoffs=(1, 1, 5), choice="similar", method="lerp"),
    MergeSettings(cutoffs=(0, 3), choice="attention", attention_window=4, attention_keep=4, attention_reach=2,
                  proportional=True),
    MergeSettings(cutoffs=(2, 4), choice="attention", attention_window=4, attention_keep=4, positions="renumber"),
    # Groups: layer 2 merged three times (up to eight tokens a slot), weighed by proportional attention.
    MergeSettings(cutoffs=(2, 2, 2), choice="attention", attention_window=4, attention_keep=2, proportional=True),
]


def label(settings: MergeSettings) -> str:
    if not settings.cutoffs:
        return "base"
    return f"{settings.choice}-{settings.cutoffs}" + ("-proportional" if settings.proportional else "")


def compare(engine, ids, settings, steps=8, bucket=decode.BUCKET, tolerance=1e-5):
    """Prefill once; feed the dynamic decode's greedy tokens to it and to a static decoder of the same session, and
    check every step's logits, next token and cache lengths. Returns the greedy tokens."""
    session = engine.prefill(ids, settings)
    static = decode.acquire(session, steps, bucket=bucket)  # copies the cache: the session goes on by itself
    token = int(session.logits.argmax())
    tokens = [token]
    for _ in range(steps):
        dynamic_logits = session.decode(token)
        static_logits = static.step(torch.tensor([[token]], device=engine.device))
        assert static_logits.dtype == torch.float32 and static_logits.shape == dynamic_logits.shape
        torch.testing.assert_close(static_logits, dynamic_logits, atol=tolerance, rtol=tolerance)
        token = int(dynamic_logits.argmax())
        assert int(static_logits.argmax()) == token
        tokens.append(token)
        assert static.kv_lengths() == session.kv_lengths()
        assert static.kv_bytes() == session.kv_bytes()
    static.release()
    return tokens


def greedy_run(engine, ids, settings, n, decode_mode):
    run = engine.start(ids, settings, Sampling(max_new_tokens=n), decode=decode_mode)
    return [step.token_id for step in run], run


# ------------------------------------------------------------------------------------------------ the same tokens


@pytest.mark.parametrize("settings", SETTINGS, ids=label)
def test_static_decode_gives_the_dynamic_logits_and_tokens(engine, settings):
    compare(engine, random_ids(40, seed=1), settings)


@pytest.mark.parametrize("settings", SETTINGS[:4], ids=label)
def test_a_buffer_with_room_to_spare_changes_nothing(settings):
    """Capacities round up to a bucket: the unused room is masked out (bucket 1: no room; 64: most of it spare)."""
    engine = tiny_engine("llama")
    assert compare(engine, random_ids(20, seed=2), settings, 5, bucket=1) == compare(
        engine, random_ids(20, seed=2), settings, 5, bucket=64)


def sliding_engine(family):
    torch.manual_seed(0)
    if family == "mistral":  # every layer slides
        model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=8, attn_implementation="sdpa"))
    else:  # full layers first, then sliding ones (max_window_layers)
        model = Qwen2ForCausalLM(Qwen2Config(**TINY, use_sliding_window=True, sliding_window=6, max_window_layers=3,
                                             attn_implementation="sdpa"))
    return MergingEngine(model.eval(), word_tokenizer())


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
@pytest.mark.parametrize("length", [40, 4], ids=["prompt-past-the-window", "window-reached-while-decoding"])
@pytest.mark.parametrize("settings", SETTINGS[:2] + [MergeSettings(cutoffs=(0, 2, 4), keep_start=2)], ids=label)
def test_sliding_window_layers_decode_exactly(family, length, settings):
    engine = sliding_engine(family)
    assert any(isinstance(layer, DynamicSlidingWindowLayer) for layer in engine.prefill(
        random_ids(length), settings).cache.layers)
    compare(engine, random_ids(length, seed=3), settings, 12)


@pytest.mark.parametrize("settings", [SETTINGS[0], SETTINGS[3], SETTINGS[5]], ids=label)
def test_eager_attention_decodes_exactly(settings):
    compare(tiny_engine("qwen2", attn="eager"), random_ids(33, seed=4), settings)


EMBEDDED_SETTINGS = [
    MergeSettings(),
    MergeSettings(cutoffs=(15,), keep_start=4, keep_end=8),
    MergeSettings(cutoffs=(0,), choice="uniform", ratio=0.5, keep_start=4, keep_end=4, proportional=True),
    MergeSettings(cutoffs=(10, 20), choice="similar", keep_start=4, keep_end=4),
    MergeSettings(cutoffs=(10, 20), choice="attention", attention_keep=8, attention_reach=7, keep_start=4,
                  keep_end=4, proportional=True),
]


@pytest.mark.parametrize("settings", EMBEDDED_SETTINGS, ids=label)
def test_embedded_model_decodes_static_exactly(embedded, settings):
    ids = embedded.encode("Explain in two sentences why the sky is blue and sunsets are red.")
    compare(embedded, ids, settings, 6, tolerance=1e-4)  # logits of size 20: float32 noise of the masked keys' sums


# ------------------------------------------------------------------------------------------- compiling the step


class CountingBackend:
    """A torch.compile backend that runs the captured graph as it is and counts the graphs it was given."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


@pytest.mark.parametrize("family, settings, lengths", [
    ("llama", SETTINGS[0], (4, 30, 300)), ("qwen2", SETTINGS[5], (16, 30, 300)), ("sliding", SETTINGS[1], (5, 30, 300)),
], ids=["base", "merged-proportional", "sliding"])
def test_the_step_traces_whole_under_torch_compile(family, settings, lengths):
    torch._dynamo.reset()
    engine = sliding_engine("mistral") if family == "sliding" else tiny_engine(family)
    backend = CountingBackend()
    step = torch.compile(decode.static_step, fullgraph=True, backend=backend)  # fullgraph: a graph break raises
    capacities = set()
    for length in lengths:  # fresh buffers each, of several capacities: one graph (the capacity is symbolic)
        session = engine.prefill(random_ids(length, seed=length), settings)
        plain = decode.StaticDecoder(engine, decode.structure(session, 4, bucket=1)).load(session)
        traced = decode.StaticDecoder(engine, plain.shapes).load(session)  # a load reads the session, no more
        traced._step = step
        token = torch.tensor([[7]])
        for _ in range(4):
            expected = plain.step(token)
            torch.testing.assert_close(traced.step(token), expected, atol=1e-5, rtol=1e-5)
            token = expected.argmax(-1, keepdim=True)  # an inference tensor now, a plain one before: one graph
        assert int(traced.state.t) == 4
        capacities.add(traced.shapes)
    assert len(capacities) >= 2 and backend.graphs == 1


# ------------------------------------------------------------------------------------------ no host work per step


SYNCS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "masked_select", "unique_consecutive",
         "_unique2", "unique_dim"}


class HostWatch(TorchDispatchMode):
    """Every aten op a block runs; those that read a value back to the host (a sync on a GPU), and those that touch a
    CPU tensor (made on the host: a factory with device cpu, or a host-to-device copy) while the model is not on
    the CPU."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncs, self.on_cpu = Counter(), [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        self.ops[name] += 1
        if name in SYNCS:
            self.syncs.append(name)
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tree_leaves((args, kwargs, out))):
            self.on_cpu.append(name)
        return out


def watched_step(decoder, token) -> HostWatch:
    with HostWatch() as watch:
        decoder.step(token)
    return watch


def elsewhere(engine) -> MergingEngine:
    """The engine's model on the meta device: where a CPU tensor is one made on the host, as on a GPU."""
    return MergingEngine(copy.deepcopy(engine.model).to("meta"), engine.tokenizer)


@pytest.mark.parametrize("settings", [SETTINGS[0], SETTINGS[5]], ids=label)
def test_a_static_step_makes_no_sync_and_no_host_tensor(settings):
    engine = tiny_engine("llama")
    session = engine.prefill(random_ids(30), settings)
    on_cpu = decode.acquire(session, 4)
    token = torch.tensor([[5]])
    on_cpu.step(token)
    assert watched_step(on_cpu, token).syncs == []
    meta = decode.StaticDecoder(elsewhere(engine), on_cpu.shapes).load(session)
    watch = watched_step(meta, torch.zeros((1, 1), dtype=torch.long, device="meta"))
    assert watch.syncs == [] and watch.on_cpu == []
    assert watch.ops["index_copy_"] == 2 * engine.num_layers  # every layer wrote its key and value in place


def test_the_host_watch_catches_a_sync_or_a_host_tensor_crept_into_a_step():
    """The check above is only as good as its watch: plant each fault in a step and see it caught."""
    engine = tiny_engine("llama")
    session = engine.prefill(random_ids(30), SETTINGS[1])

    def with_a_sync(engine, state):
        if int(state.t) > 100:  # a host branch on a device value
            pass
        return decode.static_step(engine, state)

    def with_a_host_tensor(engine, state):
        state.t.add_(torch.tensor(0).to(state.t.device))  # made on the host, copied over
        return decode.static_step(engine, state)

    on_cpu = decode.acquire(session, 4)
    on_cpu._step = with_a_sync
    assert watched_step(on_cpu, torch.tensor([[5]])).syncs in (["item"], ["_local_scalar_dense"])
    meta = decode.StaticDecoder(elsewhere(engine), on_cpu.shapes).load(session)
    meta._step = with_a_host_tensor
    assert "lift_fresh" in watched_step(meta, torch.zeros((1, 1), dtype=torch.long, device="meta")).on_cpu


def test_the_dynamic_step_is_what_the_static_one_replaces():
    """For the record (and the report): the dynamic step makes host tensors and copies them over every step."""
    engine = tiny_engine("llama")
    session = engine.prefill(random_ids(30), SETTINGS[5])
    meta = elsewhere(engine)
    cache = DynamicCache(config=meta.config)
    for index, layer in enumerate(session.cache.layers):
        cache.update(layer.keys.to("meta"), layer.values.to("meta"), index)
    dynamic = Session(meta, cache, session.layout, [], session.length, None)
    with HostWatch() as watch:
        dynamic.decode(torch.zeros((1, 1), dtype=torch.long, device="meta"))
    assert watch.on_cpu  # positions (and proportional biases) built on the host for each segment


# ---------------------------------------------------------------------------------------------- the pool, bounds


def test_a_pooled_decoder_serves_the_next_prompt_of_its_bucket_exactly():
    engine = tiny_engine("qwen2")
    decode.clear(engine)
    settings = SETTINGS[2]
    long, short = random_ids(40, seed=8), random_ids(33, seed=9)
    first = decode.acquire(engine.prefill(long, settings), 6)
    first.step(torch.tensor([[4]]))
    first.release()
    assert decode.idle(engine) == 1
    second = decode.acquire(engine.prefill(short, settings), 6)
    assert second is first and decode.idle(engine) == 0  # same shapes: the same buffers, stale keys masked out
    second.release()
    compare(engine, short, settings, 6)  # and it decodes the shorter prompt exactly (from the pool again)


def test_a_full_decoder_refuses_another_token():
    engine = tiny_engine("llama")
    session = engine.prefill(random_ids(10), MergeSettings())
    static = decode.acquire(session, 4, bucket=1)
    token = torch.tensor([[3]])
    for _ in range(4):
        static.step(token)
    with pytest.raises(ValueError, match="full"):
        static.step(token)


# ------------------------------------------------------------------------------------------------------- runs


@pytest.mark.parametrize("settings", [SETTINGS[0], SETTINGS[2], SETTINGS[5]], ids=label)
def test_a_static_run_gives_the_dynamic_runs_tokens_and_trace(engine, settings):
    ids = random_ids(30, seed=5)
    dynamic_tokens, dynamic = greedy_run(engine, ids, settings, 10, "dynamic")
    static_tokens, static = greedy_run(engine, ids, settings, 10, "static")
    assert static_tokens == dynamic_tokens
    assert static.trace.decode == "static" and dynamic.trace.decode == "dynamic"
    assert static.trace.decode_warmup_s >= 0 and dynamic.trace.decode_warmup_s == 0
    assert len(static.trace.decode_s) == len(static_tokens) - 1  # the warm-up is in no step
    assert static.trace.kv_bytes_per_layer == dynamic.trace.kv_bytes_per_layer
    assert static.trace.text == dynamic.trace.text and static.trace.finished


def test_a_sampled_static_run_draws_the_dynamic_runs_tokens():
    engine = tiny_engine("mistral")
    sampling = Sampling(max_new_tokens=12, temperature=1.3, top_p=0.9, seed=3)
    ids, settings = random_ids(25), MergeSettings(cutoffs=(2,), proportional=True)
    runs = [engine.start(ids, settings, sampling, decode=mode) for mode in ("dynamic", "static")]
    assert [s.token_id for s in runs[0]] == [s.token_id for s in runs[1]]


def test_on_a_cpu_runs_decode_dynamic_by_default_and_unknown_decodes_are_refused(monkeypatch):
    engine = tiny_engine("llama")
    _, run = greedy_run(engine, random_ids(12), MergeSettings(), 3, None)
    assert run.trace.decode == "dynamic" and run.trace.decode_warmup_s == 0
    assert decode.default_mode(torch.device("cpu")) == "dynamic"
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert decode.default_mode(torch.device("cuda", 0)) == "graph"
    monkeypatch.setenv("SPACES_ZERO_GPU", "1")  # recorded graphs would not outlive the call that holds the GPU
    assert decode.default_mode(torch.device("cuda", 0)) == "static"
    with pytest.raises(ValueError, match="unknown decode 'fast'; choose one of dynamic, static, graph, compiled"):
        engine.start(random_ids(12), decode="fast")


def test_what_static_cannot_run_exactly_decodes_dynamic_and_says_why(monkeypatch):
    engine = tiny_engine("llama")
    ids = random_ids(20)
    expected, _ = greedy_run(engine, ids, SETTINGS[1], 5, "dynamic")
    monkeypatch.setattr(engine.decoder.rotary_emb, "rope_type", "dynamic")  # inv_freq unchanged at these lengths
    tokens, run = greedy_run(engine, ids, SETTINGS[1], 5, "static")
    assert tokens == expected
    assert run.trace.decode.startswith("dynamic (dynamic RoPE recomputes its frequencies")
    with pytest.raises(ValueError, match="static decoding cannot run this session"):
        decode.acquire(run.session, 4)


def test_a_compiled_run_and_its_fallback_give_the_dynamic_tokens(monkeypatch):
    """decode="compiled" on a CPU, with torch.compile's eager backend standing in for CUDA graphs: the same tokens,
    compiled once per structure ahead of the runs (`decode.warm_up`), whatever the prompt's length; a compile that
    fails decodes uncompiled and says so."""
    torch._dynamo.reset()
    engine = tiny_engine("llama")
    decode.clear(engine)
    backend = CountingBackend()
    monkeypatch.setattr(decode, "compiled_step",
                        lambda: torch.compile(decode.static_step, fullgraph=True, backend=backend))
    settings = SETTINGS[2]
    assert decode.warm_up(engine, [MergeSettings(), settings], "compiled") > 0
    assert backend.graphs == 2 and decode.idle(engine) == 2
    for length in (24, 300):
        ids = random_ids(length)
        for merge in (MergeSettings(), settings):
            expected, _ = greedy_run(engine, ids, merge, 8, "dynamic")
            tokens, run = greedy_run(engine, ids, merge, 8, "compiled")
            assert tokens == expected and run.trace.decode == "compiled"
    assert backend.graphs == 2
    again, run = greedy_run(engine, ids, settings, 8, "compiled")  # the pooled decoder: warm already
    assert again == expected and run.trace.decode_warmup_s < 1 and run.static is None  # handed back
    assert decode.warm_up(engine, [settings], "dynamic") == 0

    def broken():
        def step(*args):
            raise RuntimeError("no compiler here")
        return step

    decode.clear(engine)
    monkeypatch.setattr(decode, "compiled_step", broken)
    tokens, run = greedy_run(engine, ids, settings, 8, "compiled")
    assert tokens == expected
    assert run.trace.decode == "static (torch.compile failed (RuntimeError: no compiler here); decoding uncompiled)"


def test_the_pool_keeps_few_decoders_and_a_closed_run_returns_its_own():
    engine = tiny_engine("llama")
    decode.clear(engine)
    runs = [engine.start(random_ids(20), MergeSettings(cutoffs=(c,)), Sampling(max_new_tokens=5), decode="static")
            for c in range(1, 5)]
    for run in runs:
        next(run), next(run)  # past the prefill: each run holds its decoder
    assert decode.idle(engine) == 0
    for run in runs:
        run.close()
    assert decode.idle(engine) == decode.MAX_IDLE


def test_two_interleaved_static_runs_of_one_shape_use_two_decoders():
    engine = tiny_engine("mistral")
    ids = random_ids(20)
    expected, _ = greedy_run(engine, ids, MergeSettings(), 6, "dynamic")
    a = engine.start(ids, MergeSettings(), Sampling(max_new_tokens=6), decode="static")
    b = engine.start(ids, MergeSettings(), Sampling(max_new_tokens=6), decode="static")
    rounds = list(interleave(a, b))
    assert [x.token_id for x, _ in rounds] == [y.token_id for _, y in rounds] == expected


def test_stop_takes_effect_between_static_steps():
    engine = tiny_engine("llama")
    stop = threading.Event()
    run = engine.start(random_ids(12), MergeSettings(cutoffs=(2,)), Sampling(max_new_tokens=10), interrupt=stop,
                       decode="static")
    next(run), next(run)
    stop.set()
    with pytest.raises(Interrupted):
        next(run)


def test_a_graph_decode_without_a_gpu_decodes_static_and_says_why():
    engine = tiny_engine("llama")
    ids = random_ids(20)
    expected, _ = greedy_run(engine, ids, SETTINGS[1], 5, "dynamic")
    tokens, run = greedy_run(engine, ids, SETTINGS[1], 5, "graph")
    assert tokens == expected
    assert run.trace.decode == "static (CUDA graphs need a GPU; decoding uncaptured)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on one: pytest -k on_a_gpu)")
@pytest.mark.parametrize("family", ["mistral", "llama", "qwen2"])
def test_on_a_gpu_every_decode_gives_the_dynamic_tokens(family):
    # On CUDA the recorded graph and the compiled step replay the static step's kernels. float32, so that a token
    # decided by a rounding of bf16 (a random tiny model's logits lie close) cannot stand for a wrong path.
    from conftest import tiny_model, word_tokenizer
    from slerpviz.engine import MergingEngine

    engine = MergingEngine(tiny_model(family).to("cuda"), word_tokenizer())
    ids = random_ids(60, seed=5).cuda()
    for settings in (MergeSettings(), MergeSettings(cutoffs=(1, 4), ratio=(0.5, 1.0)),
                     MergeSettings(cutoffs=(2,), choice="attention", ratio=0.5, attention_keep=4, proportional=True)):
        expected, _ = greedy_run(engine, ids, settings, 12, "dynamic")
        for mode in ("static", "graph", "compiled"):
            tokens, run = greedy_run(engine, ids, settings, 12, mode)
            assert run.trace.decode == mode, run.trace.decode
            assert tokens == expected, (mode, settings)
