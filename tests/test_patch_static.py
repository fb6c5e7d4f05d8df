"""The patch with a static cache: `generate(..., cache_implementation="static")` under `slerpviz.merging` decodes
through slerpviz.decode's static decoder (a CUDA graph on a GPU), with the dynamic path's tokens and logits."""

import gc
import weakref

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, StaticCache

import slerpviz
from conftest import FAMILIES, TINY, random_ids, tiny_model
from slerpviz import decode
from slerpviz.bench.ops import OpCounter
from slerpviz.engine import MergeSettings
from slerpviz.forward import LayerwiseModel
from slerpviz.presets import recommended

NEW = 10
SETTINGS = [
    MergeSettings(),
    MergeSettings(cutoffs=(2, 4), keep_start=3, keep_end=2, ratio=(0.5, 1.0), positions="first"),
    MergeSettings(cutoffs=(1, 4), choice="attention", ratio=0.5, attention_window=4, attention_keep=3),
    MergeSettings(cutoffs=(0, 3), proportional=True, choice="similar"),
]


def greedy(model, ids, n=NEW, **options):
    """generate's greedy tokens and each step's logits, without an EOS stop so runs compare step for step."""
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True, **options)
    return out.sequences[0, ids.shape[1]:].tolist(), torch.cat(out.logits)


def forward_of(model):
    return model.model.__dict__["forward"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s.cutoffs}-{s.choice}-{s.proportional}")
def test_a_static_cache_decodes_statically_with_the_dynamic_paths_tokens_and_logits(model, settings):
    ids = random_ids(33, seed=4)
    with slerpviz.merging(model, settings):
        tokens, logits = greedy(model, ids)
        static_tokens, static_logits = greedy(model, ids, cache_implementation="static")
        assert forward_of(model).decode_path == "static"
    assert static_tokens == tokens
    torch.testing.assert_close(static_logits, logits, atol=2e-5, rtol=1e-4)


def test_a_static_cache_holds_one_generation_its_decoder_is_pooled_and_freed_with_the_patch(model):
    settings = SETTINGS[2]
    first, second = random_ids(30, seed=5), random_ids(26, seed=6)
    with slerpviz.merging(model, settings):
        expected = [greedy(model, first)[0], greedy(model, second)[0]]
        cache = StaticCache(config=model.config, max_cache_len=64)
        # The same cache twice: transformers counts it empty (slerpviz never writes it), so each call is a new prompt.
        got, decoders = [], []
        for ids in (first, second):
            got.append(greedy(model, ids, cache=cache)[0])
            decoders.append(forward_of(model)._static[cache].decoder)
        # The first prompt's decoder went back to the pool when the second began, which took it again.
        assert decoders[0] is decoders[1]
        engine = forward_of(model).engine
        assert decode.idle(engine) == 0
        del cache, decoders
        gc.collect()
        assert decode.idle(engine) == 1  # released when its cache went
        greedy(model, first, cache_implementation="static")  # generate's own cache takes it, and gives it back
        gc.collect()
        assert decode.idle(engine) == 1
        kept = StaticCache(config=model.config, max_cache_len=64)
        greedy(model, first, cache=kept)
        buffers = weakref.ref(forward_of(model)._static[kept].decoder)
    assert got == expected
    # Off with the patch go its decoders and their buffers, though the caller still holds a static cache.
    assert decode.idle(engine) == 0
    gc.collect()
    assert buffers() is None and kept is not None


def test_what_a_static_cache_cannot_hold_or_continue_is_refused(model):
    ids = random_ids(30, seed=7)
    with slerpviz.merging(model, SETTINGS[1]), torch.no_grad():
        with pytest.raises(ValueError, match="made for 30 tokens, which leaves no room after the prompt's 30"):
            model(ids, cache=StaticCache(config=model.config, max_cache_len=30), logits_to_keep=1)
        cache = StaticCache(config=model.config, max_cache_len=40)
        with pytest.raises(ValueError, match="rows asked for would depend on a later token"):
            model(ids, cache=cache)  # every row, as on the dynamic path
        with pytest.raises(ValueError, match="position_ids other than the running count"):
            model(ids, cache=cache, position_ids=torch.arange(30)[None] * 3, logits_to_keep=1)
        model(ids, cache=cache, logits_to_keep=1)
        full = StaticCache(config=model.config, max_cache_len=33)  # as plain generate, which fails past it
        with pytest.raises(ValueError, match="made for 33 tokens, and this would be token 34: give it a max_cache_len"):
            model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0, cache=full)
        with pytest.raises(ValueError, match=r"from where it stopped \(token 30\), but this call feeds 1 from token 31"):
            model(ids[:, :1], cache=cache, position_ids=torch.tensor([[31]]), logits_to_keep=1)
        with pytest.raises(ValueError, match="longer than the prompt"):  # a new prompt on it, refused
            model(ids[:, :4], cache=cache, position_ids=torch.arange(4)[None], logits_to_keep=1)
        with pytest.raises(ValueError, match=r"from where it stopped \(token 0\)"):  # the old one is gone with it
            model(ids[:, :1], cache=cache, position_ids=torch.tensor([[30]]), logits_to_keep=1)
        model(ids, cache=cache, logits_to_keep=1)
        with pytest.raises(ValueError, match="feeds token ids after the prompt, not inputs_embeds"):
            model(inputs_embeds=model.model.embed_tokens(ids[:, :1]), cache=cache, logits_to_keep=1)
        with pytest.raises(ValueError, match=r"an offloaded static cache \(offloaded_static\) is not supported"):
            model.generate(ids, max_new_tokens=2, cache_implementation="offloaded_static")
        with pytest.raises(ValueError, match=r"chunked prefill \(prefill_chunk_size\) is not supported"):
            model.generate(ids, max_new_tokens=2, prefill_chunk_size=8, cache_implementation="static")
    with pytest.raises(ValueError, match="unknown decode 'fastest'"):
        slerpviz.apply(model, SETTINGS[1], decode="fastest")
    assert "forward" not in model.model.__dict__


def test_a_static_decode_step_under_the_patch_reads_back_only_where_its_token_starts():
    # generate hands each step its position on the device; the merging forward reads it once to check it continues
    # the prompt (on a GPU, a wait for the device), and the static decoder's step reads nothing.
    model = tiny_model("qwen2")
    ids = random_ids(30, seed=10)
    with slerpviz.merging(model, SETTINGS[2]), torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=48)
        token = model(ids, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
        with OpCounter() as with_position:
            model(token, cache=cache, position_ids=torch.tensor([[30]]), logits_to_keep=1)
        with OpCounter() as without:
            model(token, cache=cache, logits_to_keep=1)
    assert with_position.sync_ops() == {"aten::_local_scalar_dense": 1}
    assert without.syncs == 0


def test_the_patchs_static_step_traces_as_one_whole_graph(fresh_dynamo):
    # What a GPU records as a CUDA graph (or compiles, decode="compiled"): the step that ends at the final norm must
    # trace without a break, as the engine's step does (tests/test_decode.py).
    engine = LayerwiseModel(tiny_model("qwen2"))
    session = engine.prefill(random_ids(30, seed=11), SETTINGS[3])
    plain = decode.acquire(session, 4, head=False)
    traced = decode.StaticDecoder(engine, plain.shapes, head=False).load(session)
    traced._step = torch.compile(decode.static_step, fullgraph=True, backend="eager")  # a graph break raises
    token = torch.tensor([[7]])
    for _ in range(3):
        expected = plain.step(token)
        assert expected.shape == (1, 1, engine.config.hidden_size)
        torch.testing.assert_close(traced.step(token), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_models_decode_exactly_under_a_static_cache(family):
    torch.manual_seed(0)
    if family == "mistral":  # every layer slides: the static cache cannot say its length, so decoding is dynamic
        model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=8, attn_implementation="sdpa")).eval()
    else:  # full layers say it, and the static decoder runs the sliding ones exactly
        model = Qwen2ForCausalLM(Qwen2Config(**TINY, use_sliding_window=True, sliding_window=6, max_window_layers=3,
                                             attn_implementation="sdpa")).eval()
    ids = random_ids(30, seed=8)
    with slerpviz.merging(model, SETTINGS[1]):
        tokens, logits = greedy(model, ids)
        static_tokens, static_logits = greedy(model, ids, cache_implementation="static")
        path = forward_of(model).decode_path
    assert path == ("dynamic (a sliding-window static cache does not say its length)" if family == "mistral"
                    else "static")
    assert static_tokens == tokens
    torch.testing.assert_close(static_logits, logits, atol=2e-5, rtol=1e-4)


def test_what_the_static_decoder_cannot_run_exactly_decodes_dynamically_under_a_static_cache(monkeypatch):
    model = tiny_model("llama")
    ids = random_ids(30, seed=12)
    with slerpviz.merging(model, SETTINGS[2]):
        expected = greedy(model, ids)
        monkeypatch.setattr(model.model.rotary_emb, "rope_type", "dynamic")  # inv_freq unchanged at these lengths
        tokens, logits = greedy(model, ids, cache_implementation="static")
        assert forward_of(model).decode_path.startswith("dynamic (dynamic RoPE recomputes its frequencies")
    assert tokens == expected[0]
    torch.testing.assert_close(logits, expected[1], atol=2e-5, rtol=1e-4)


def test_a_cuda_graph_asked_for_on_a_cpu_decodes_uncaptured_and_says_so():
    model = tiny_model("llama")
    ids = random_ids(30, seed=9)
    with slerpviz.merging(model, SETTINGS[1], decode="graph"):
        static_tokens, _ = greedy(model, ids, cache_implementation="static")
        assert forward_of(model).decode_path == "static (CUDA graphs need a GPU; decoding uncaptured)"
        assert static_tokens == greedy(model, ids)[0]


def test_on_the_embedded_model_a_static_cache_gives_the_dynamic_tokens_under_recommended(embedded):
    model = embedded.model
    ids = embedded.encode("Write a short list of five birds that migrate across Europe, with one fact about each.")
    with slerpviz.merging(model, recommended(embedded.num_layers)):
        tokens, logits = greedy(model, ids, 12)
        static_tokens, static_logits = greedy(model, ids, 12, cache_implementation="static")
        assert forward_of(model).decode_path == "static"
        assert forward_of(model).decode_warmup_s > 0
    assert static_tokens == tokens
    torch.testing.assert_close(static_logits, logits, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on one: pytest -k on_a_gpu)")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_on_a_gpu_a_static_cache_under_the_patch_replays_a_cuda_graph_with_the_dynamic_tokens(family):
    # float32, so that a token decided by a rounding of bf16 cannot stand for a wrong path.
    model = tiny_model(family).to("cuda")
    ids = random_ids(60, seed=5).cuda()
    for settings in SETTINGS:
        with slerpviz.merging(model, settings):
            tokens, logits = greedy(model, ids, 12)
            graph_tokens, graph_logits = greedy(model, ids, 12, cache_implementation="static")
            assert forward_of(model).decode_path == "graph", forward_of(model).decode_path
        assert graph_tokens == tokens, settings
        torch.testing.assert_close(graph_logits, logits, atol=1e-4, rtol=1e-4)
