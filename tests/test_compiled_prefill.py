"""The compiled prefill (issue 23, item 3): the prompt's decoder layers through torch.compile, one graph for every
layer, prompt length and merged length, and the merges between them, a few graphs per cutoff whatever the length,
with the eager path's plans, logits, caches and tokens.

Traced with backend="eager" (dynamo's graph capture without inductor's code generation: the same graphs and guards,
seconds instead of a compile); the speed benchmark's test compiles with inductor itself.
"""

from __future__ import annotations

import pytest
import torch

from conftest import random_ids, tiny_engine
from slerpviz.engine import MergeSettings, MergingEngine, Sampling
from slerpviz.forward import cache_lengths
from slerpviz.presets import preset

PAIRS = MergeSettings(cutoffs=(2, 4), ratio=1.0)
GROUPS = MergeSettings(cutoffs=(2, 2, 4), choice="attention", proportional=True, attention_keep=4)  # a float mask
LENGTHS = (40, 61, 90)


class GraphCounter:
    """A torch.compile backend that runs what dynamo captured as it is, counting the graphs: a layer's (`graphs`)
    and a merge's (`merges`, told by its inputs, the slots' first and last tokens)."""

    def __init__(self):
        self.graphs = self.merges = 0

    def __call__(self, graph_module, example_inputs):
        inputs = [node.name for node in graph_module.graph.nodes if node.op == "placeholder"]
        if any("first" in name for name in inputs):
            self.merges += 1
        else:
            self.graphs += 1
        return graph_module.forward


def compiled_beside_eager(family: str) -> tuple:
    eager, compiled, counter = tiny_engine(family), tiny_engine(family), GraphCounter()
    compiled.compile_prefill(backend=counter, fullgraph=True)
    return eager, compiled, counter


@pytest.mark.parametrize("family", ["mistral", "llama", "qwen2"])
def test_one_graph_serves_every_layer_and_length(family, fresh_dynamo):
    eager, compiled, counter = compiled_beside_eager(family)
    for settings in (MergeSettings(), PAIRS):
        for length in LENGTHS:
            ids = random_ids(length, seed=length)
            a, b = eager.prefill(ids, settings), compiled.prefill(ids, settings)
            torch.testing.assert_close(b.logits, a.logits)
            assert cache_lengths(b.cache) == cache_lengths(a.cache)
            torch.testing.assert_close(b.decode(5), a.decode(5))  # the caches it wrote carry the decode on
    # Six layers, three lengths, and merged lengths after two cutoffs: without a mask, one graph for all of them.
    assert counter.graphs == 1
    # A merge: a graph per cutoff, one more where the parity of the pairs' count changes what is rounded; none more
    # for further lengths.
    merges = counter.merges
    assert 2 <= merges <= 4
    for length in (47, 52, 75, 100, 128):
        compiled.prefill(random_ids(length, seed=length), PAIRS)
    assert counter.merges == merges
    # Proportional attention's float mask is one more kind of call (Qwen2's attention compiles one more for it).
    for length in LENGTHS:
        ids = random_ids(length, seed=length)
        torch.testing.assert_close(compiled.prefill(ids, GROUPS).logits, eager.prefill(ids, GROUPS).logits)
    assert counter.graphs <= 3


EVERY_CHOICE = [
    MergeSettings(cutoffs=(2,), choice="uniform", ratio=0.5),
    MergeSettings(cutoffs=(1, 3), choice="similar", ratio=(0.5, 1.0), keep_start=2, keep_end=3),
    MergeSettings(cutoffs=(3,), choice="attention", ratio=0.5, attention_window=4, attention_keep=2,
                  attention_keep_share=0.1, attention_reach=2, cosine_share=0.25),
    MergeSettings(cutoffs=(3,), choice="attention", ratio=0.5, attention_keep=3, method="drop", positions="first"),
    MergeSettings(cutoffs=(0, 5), method="lerp", positions="renumber"),
    MergeSettings(cutoffs=(2,), method="slerp-dir", size_weighted=False),
]


@pytest.mark.parametrize("settings", EVERY_CHOICE, ids=lambda s: f"{s.choice}-{s.method}-{s.positions}")
def test_every_pair_choice_merges_in_one_graph_as_the_eager_path_does(settings, fresh_dynamo):
    # fullgraph=True: a break (a value read back outside the graph) would raise here, not slow down silently.
    eager, compiled, counter = compiled_beside_eager("llama")
    for length in LENGTHS:
        ids = random_ids(length, seed=length)
        a, b = eager.prefill(ids, settings), compiled.prefill(ids, settings)
        assert [s.first.tolist() for s in b.stages] == [s.first.tolist() for s in a.stages]
        torch.testing.assert_close(b.logits, a.logits)
    assert counter.merges >= 1


def test_a_sliding_window_cache_is_written_through_its_own_layer(fresh_dynamo):
    # Mistral's sliding-window layers keep only the window: each layer's own cache class does the writing.
    from transformers import MistralConfig, MistralForCausalLM

    from conftest import TINY, word_tokenizer

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=16, attn_implementation="sdpa")).eval()
    eager, compiled = MergingEngine(model, word_tokenizer()), MergingEngine(model, word_tokenizer())
    compiled.compile_prefill(backend=GraphCounter(), fullgraph=True)
    sampling = Sampling(max_new_tokens=6, temperature=0.0)
    for settings in (MergeSettings(), PAIRS, EVERY_CHOICE[2]):
        ids = random_ids(70, seed=7)
        a, b = eager.prefill(ids, settings), compiled.prefill(ids, settings)
        torch.testing.assert_close(b.logits, a.logits)
        assert cache_lengths(b.cache) == cache_lengths(a.cache)
        tokens = [[step.token_id for step in engine.start(ids, settings, sampling, decode="dynamic")]
                  for engine in (eager, compiled)]
        assert tokens[1] == tokens[0]


def test_without_a_cache_and_on_the_eager_path_for_a_while(fresh_dynamo):
    eager, compiled, counter = compiled_beside_eager("mistral")
    ids = random_ids(50)
    torch.testing.assert_close(compiled.prefill(ids, PAIRS, cached=False).logits,
                               eager.prefill(ids, PAIRS, cached=False).logits)
    graphs = counter.graphs, counter.merges
    with compiled.prefill_path("eager"):
        assert not compiled.compiled_prefill
        compiled.prefill(ids, PAIRS)
    # Nothing traced while eager, and compiled again after.
    assert compiled.compiled_prefill and (counter.graphs, counter.merges) == graphs
    with compiled.prefill_path("compiled"):
        compiled.prefill(ids, PAIRS)
    with pytest.raises(ValueError, match="the prefill is not compiled: call compile_prefill"):
        with eager.prefill_path("compiled"):
            pass
    with pytest.raises(ValueError, match="unknown prefill 'fused'; choose one of eager, compiled"):
        with compiled.prefill_path("fused"):
            pass
    compiled.uncompile_prefill()
    graphs = counter.graphs, counter.merges
    compiled.prefill(ids, PAIRS)
    assert not compiled.compiled_prefill and (counter.graphs, counter.merges) == graphs


def test_warm_up_pays_the_compile_before_the_first_prompt(fresh_dynamo):
    _, compiled, counter = compiled_beside_eager("llama")
    assert compiled.warm_up_prefill([MergeSettings(), GROUPS]) > 0
    graphs = counter.graphs
    for length in LENGTHS:
        compiled.prefill(random_ids(length, seed=length), GROUPS)
        compiled.prefill(random_ids(length, seed=length), MergeSettings())
    assert counter.graphs == graphs  # the layers' (a merge may meet the other parity of its pairs' count)
    assert tiny_engine("llama").warm_up_prefill() == 0.0  # uncompiled: nothing to warm


def test_embedded_model_gives_the_same_tokens(embedded, fresh_dynamo):
    prompt = embedded.encode("List three facts about rivers, then explain how a river forms a delta, in detail. " * 6)
    settings = preset("recommended", embedded.num_layers)
    sampling = Sampling(max_new_tokens=6, temperature=0.0)
    compiled = MergingEngine(embedded.model, embedded.tokenizer)  # the same weights; the shared engine stays eager
    compiled.compile_prefill(backend=GraphCounter(), fullgraph=True)
    tokens = [[step.token_id for step in engine.start(prompt, settings, sampling, decode="dynamic")]
              for engine in (embedded, compiled)]
    assert tokens[1] == tokens[0] and len(tokens[0]) == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on one: pytest -k on_a_gpu)")
def test_on_a_gpu_the_inductor_prefill_gives_the_eager_tokens(fresh_dynamo):
    # Inductor's own kernels (Triton), float32 as in test_decode's GPU test: a token must not hang on a rounding.
    from conftest import tiny_model, word_tokenizer

    eager = MergingEngine(tiny_model("mistral").to("cuda"), word_tokenizer())
    compiled = MergingEngine(eager.model, eager.tokenizer)
    compiled.compile_prefill()
    ids = random_ids(60, seed=5).cuda()
    sampling = Sampling(max_new_tokens=8, temperature=0.0)
    for settings in (MergeSettings(), PAIRS, GROUPS):
        tokens = [[step.token_id for step in engine.start(ids, settings, sampling, decode="dynamic")]
                  for engine in (eager, compiled)]
        assert tokens[1] == tokens[0], settings
