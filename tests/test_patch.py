"""The patch: a model's own forward, `generate` and pipelines merge inside `with slerpviz.merging(...)`."""

import pytest
import torch
from transformers import DynamicCache, pipeline

import slerpviz
from conftest import FAMILIES, TINY, random_ids, tiny_model, word_tokenizer
from slerpviz.engine import MergeSettings, MergingEngine, Sampling
from slerpviz.patch import MergingForward

N_LAYERS = TINY["num_hidden_layers"]
NEW = 8


def plain_generate(model, ids, n=NEW):
    """Greedy tokens from the model's own generate; no EOS stop, so runs compare token for token."""
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def engine_tokens(model, ids, settings, n=NEW):
    engine = MergingEngine(model, word_tokenizer())
    engine.eos_ids = set()  # as generate above: run all n tokens
    run = engine.start(ids, settings, Sampling(max_new_tokens=n))
    return [step.token_id for step in run]


def is_patched(model) -> bool:
    return isinstance(model.model.__dict__.get("forward"), MergingForward)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request):
    return tiny_model(request.param)


# ------------------------------------------------------------------------------------------- no cutoffs: the model


def test_with_no_cutoffs_patched_generate_is_plain_generate(model):
    ids = random_ids(21, seed=1)
    reference = plain_generate(model, ids)
    with slerpviz.merging(model, MergeSettings()):
        assert is_patched(model)
        patched = plain_generate(model, ids)
        with torch.no_grad():
            logits = model(ids).logits
    assert patched == reference
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_on_the_embedded_model_the_patch_is_the_model_without_cutoffs_and_the_engine_with(embedded):
    model = embedded.model
    ids = embedded.encode("Name three rivers in Europe and say which is the longest.")
    reference = plain_generate(model, ids, 6)
    with slerpviz.merging(model, MergeSettings()):
        assert plain_generate(model, ids, 6) == reference
    settings = MergeSettings(cutoffs=(15, 20), ratio=(0.5, 1.0), choice="attention", keep_end=4)
    with slerpviz.merging(model, settings):
        patched = plain_generate(model, ids, 6)
    engine_tokens = [step.token_id for step in embedded.start(ids, settings, Sampling(max_new_tokens=6))]
    # The engine stops at EOS, where generate may be told to go on: compare as far as the engine went.
    assert engine_tokens and patched[:len(engine_tokens)] == engine_tokens


# ------------------------------------------------------------------------------------- with cutoffs: the engine


SETTINGS = [
    MergeSettings(cutoffs=(3,)),
    MergeSettings(cutoffs=(2, 4), keep_start=3, keep_end=2, ratio=(0.5, 1.0), positions="first"),
    MergeSettings(cutoffs=(2,), choice="similar", ratio=0.5, method="lerp"),
    MergeSettings(cutoffs=(1, 4), choice="attention", ratio=0.5, attention_window=4, attention_keep=3),
    MergeSettings(cutoffs=(0, 3), proportional=True),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s.cutoffs}-{s.choice}-{s.proportional}")
def test_patched_generate_equals_the_engines_run(model, settings):
    ids = random_ids(30, seed=2)
    with slerpviz.merging(model, settings):
        patched = plain_generate(model, ids)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    assert patched == engine_tokens(model, ids, settings)
    assert cache.layers[-1].get_seq_length() < ids.shape[1]  # the model's own forward did merge


def test_a_whole_forward_gives_the_engines_last_logits_and_refuses_rows_that_see_the_next_token(model):
    ids = random_ids(25, seed=3)
    settings = MergeSettings(cutoffs=(2,), keep_end=4)
    with slerpviz.merging(model, settings), torch.no_grad():
        last = model(ids, use_cache=False, logits_to_keep=1).logits
        tail = model(ids, use_cache=False, logits_to_keep=4).logits  # keep_end's tokens: never merged
        with pytest.raises(ValueError, match=r"rows asked for would depend on a later token \(row \d+ shares a "
                                             r"merged slot with the token it predicts;.*generate_until tasks run"):
            model(ids, use_cache=False)  # all rows, as lm-eval's loglikelihood asks
        with pytest.raises(ValueError, match="rows asked for would depend on a later token"):
            model.model(ids, use_cache=False)  # the decoder on its own is read whole
    engine = MergingEngine(model, word_tokenizer())
    assert last.shape[1] == 1 and tail.shape[1] == 4
    torch.testing.assert_close(last[:, -1].float(), engine.prefill(ids, settings).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tail[:, -1:], last)


CAUSAL_SETTINGS = [
    MergeSettings(cutoffs=(2,), keep_end=4),
    MergeSettings(cutoffs=(1, 4), ratio=(0.5, 1.0), choice="uniform", keep_start=2, keep_end=3, proportional=True),
    MergeSettings(cutoffs=(2,), ratio=0.5, choice="similar", keep_end=4),
    MergeSettings(cutoffs=(1, 3), ratio=(0.5, 1.0), choice="attention", attention_window=4, attention_keep=2,
                  keep_end=4),
    MergeSettings(cutoffs=(3,), method="seed-2024", keep_end=4),
    MergeSettings(cutoffs=(N_LAYERS,)),  # merged after the last layer: the rows themselves are mixed
]


@pytest.mark.parametrize("settings", CAUSAL_SETTINGS, ids=lambda s: f"{s.cutoffs}-{s.choice}-{s.method}")
def test_no_row_a_whole_forward_returns_moves_when_a_later_token_changes(settings):
    """Causality, as a log-likelihood harness relies on it: change token k, and every row before k that the forward
    returns stays as it was; a call that would return a row that moves is refused."""
    from transformers.modeling_utils import slice_logits_to_keep

    model = tiny_model("llama")
    length = 24
    ids = random_ids(length, seed=11)
    asks = [0, 1, 3, 4, 9, torch.arange(0, length, 2)]
    returned = {}  # ask -> logits, for the asks not refused
    with slerpviz.merging(model, settings), torch.no_grad():
        for index, rows in enumerate(asks):
            try:
                returned[index] = model(ids, use_cache=False, logits_to_keep=rows).logits
            except ValueError as error:
                assert "would depend on a later token" in str(error)
        for k in range(1, length):
            changed = ids.clone()
            changed[0, k] = 3 + (int(ids[0, k]) - 3 + 1) % (TINY["vocab_size"] - 3)
            for index, logits in returned.items():
                positions = slice_logits_to_keep(torch.arange(length).view(1, length, 1), asks[index]).reshape(-1)
                try:
                    moved = model(changed, use_cache=False, logits_to_keep=asks[index]).logits
                except ValueError:
                    continue  # refused is honest too
                before = positions < k
                torch.testing.assert_close(moved[:, before], logits[:, before], atol=1e-5, rtol=1e-5,
                                           msg=f"a row before token {k} moved (logits_to_keep={asks[index]})")
    assert 1 in returned and 0 not in returned  # the last row always; all rows never, once something merged
    if settings.choice == "consecutive" and settings.method == "slerp" and settings.keep_end >= 4:
        assert {2, 3} <= set(returned)  # rows of tokens keep_end protects end their own slots


def test_on_the_embedded_model_the_recommended_preset_never_returns_a_row_that_saw_its_answer(embedded):
    """The issue's measurement: 600 tokens, recommended; token 300 changed moved row 299 of a whole forward."""
    from slerpviz.presets import recommended

    model = embedded.model
    ids = torch.randint(100, 20000, (1, 600), generator=torch.Generator().manual_seed(21))
    changed = ids.clone()
    changed[0, 300] = ids[0, 300] + 1
    with slerpviz.merging(model, recommended(embedded.num_layers)), torch.no_grad():
        with pytest.raises(ValueError, match="rows asked for would depend on a later token .*'attention' choice"):
            model(ids, use_cache=False)
        with pytest.raises(ValueError, match="would depend on a later token"):
            model(ids, use_cache=False, logits_to_keep=302)  # the rows from 298 on
        last = model(ids, use_cache=False, logits_to_keep=1).logits
    session = embedded.prefill(ids, recommended(embedded.num_layers), cached=False)
    torch.testing.assert_close(last[:, -1].float(), session.logits, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- always taken off


def test_the_patch_is_gone_after_the_block_and_after_an_exception(model):
    ids = random_ids(20, seed=4)
    reference = plain_generate(model, ids)
    with slerpviz.merging(model, MergeSettings(cutoffs=(2,))):
        pass
    assert not is_patched(model) and "forward" not in model.model.__dict__
    with pytest.raises(RuntimeError, match="boom"):
        with slerpviz.merging(model, MergeSettings(cutoffs=(2,))):
            raise RuntimeError("boom")
    assert not is_patched(model)
    assert plain_generate(model, ids) == reference


def test_apply_and_remove_and_an_instance_forward_that_was_there_comes_back(model):
    original = model.model.forward
    model.model.forward = original  # an instance attribute, as accelerate's hooks set one
    try:
        slerpviz.apply(model, MergeSettings(cutoffs=(2,)))
        with pytest.raises(ValueError, match="already merging"):
            slerpviz.apply(model, MergeSettings(cutoffs=(3,)))
        slerpviz.remove(model)
        assert model.model.__dict__["forward"] is original
        slerpviz.remove(model)  # a model without the patch is left as it is
        assert model.model.__dict__["forward"] is original
    finally:
        model.model.__dict__.pop("forward", None)


# ---------------------------------------------------------------------------------------------- what it refuses


def test_bad_settings_right_padding_and_foreign_caches_are_refused_clearly(model):
    with pytest.raises(ValueError, match="cutoff 99 is out of range"):
        slerpviz.apply(model, MergeSettings(cutoffs=(99,)))
    assert not is_patched(model)
    ids = random_ids(12, seed=5)
    with slerpviz.merging(model, MergeSettings(cutoffs=(2,))), torch.no_grad():
        padded = torch.ones_like(ids)
        padded[0, -3:] = 0
        with pytest.raises(ValueError, match="padding on the left only.*padding_side = 'left'"):
            model(ids, attention_mask=padded)
        with pytest.raises(ValueError, match="longer than the prompt"):
            slerpviz.remove(model)
            slerpviz.apply(model, MergeSettings(cutoffs=(2,), keep_start=8))
            model(ids[:, :6])
    foreign = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=foreign, use_cache=True)
    with slerpviz.merging(model, MergeSettings(cutoffs=(2,))), torch.no_grad():
        with pytest.raises(ValueError, match="not filled by this merging forward"):
            model(ids[:, -1:], cache=foreign, use_cache=True)
    assert not is_patched(model)


@pytest.mark.parametrize("drafts", ["prompt_lookup_num_tokens", "assistant_model"])
def test_assisted_and_prompt_lookup_generation_are_refused(model, drafts):
    # They feed draft tokens with the prompt (which would merge them into it) and crop the cache back to the
    # accepted ones (which the merged cache's own count of tokens would not follow).
    ids = torch.cat([random_ids(10, seed=7)] * 3, dim=1)
    options = {drafts: tiny_model(model.config.model_type) if drafts == "assistant_model" else 3}
    with slerpviz.merging(model, MergeSettings()), torch.no_grad():
        with pytest.raises(ValueError, match=f"generation \\({drafts}\\) are not supported while merging"):
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                           eos_token_id=None, pad_token_id=0, **options)
        cache = DynamicCache(config=model.config)
        model(ids, cache=cache, use_cache=True)
        cache.crop(-5)  # what they do behind the forward's back: drop the last 5 entries of every layer
        with pytest.raises(ValueError, match="cache was changed outside slerpviz's merging"):
            model(ids[:, -1:], cache=cache, use_cache=True)
    assert "generate" not in model.__dict__


def test_a_merged_cache_continues_only_by_the_tokens_it_has_not_seen(model):
    # With a cutoff at layer 0 the first layer's cache is shorter than the tokens seen, and generate counts a cache
    # by its first layer: a second generate on the same cache would feed tokens again; it is refused.
    ids = random_ids(20, seed=8)
    with slerpviz.merging(model, MergeSettings(cutoffs=(0,))), torch.no_grad():
        cache = DynamicCache(config=model.config)
        options = dict(max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0, past_key_values=cache)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **options)
        more = torch.cat([out, ids[:, :4]], dim=1)
        with pytest.raises(ValueError, match="continues the merged cache from token 13, but it holds 22 tokens"):
            model.generate(more, attention_mask=torch.ones_like(more), **options)
        with pytest.raises(ValueError, match="position_ids other than the running count"):
            model(ids, position_ids=torch.arange(20)[None] * 3)


def test_the_model_gets_its_training_mode_back(model):
    model.train()
    try:
        with slerpviz.merging(model, MergeSettings(cutoffs=(2,))):
            assert not model.training
        assert model.training
    finally:
        model.eval()


# -------------------------------------------------------------------------------------------------- the pipeline


def test_a_text_generation_pipeline_merges_under_the_patch(embedded):
    generator = pipeline("text-generation", model=embedded.model, tokenizer=embedded.tokenizer)
    question = "Name three rivers in Europe and say which is the longest."
    messages = [{"role": "user", "content": question}]
    settings = MergeSettings(cutoffs=(4,))
    options = dict(max_new_tokens=8, do_sample=False, return_full_text=False)
    plain = generator(messages, **options)[0]["generated_text"]
    with slerpviz.merging(embedded.model, settings):
        merged = generator(messages, **options)[0]["generated_text"]
    run = embedded.start(embedded.encode(question), settings, Sampling(max_new_tokens=8))
    for _ in run:
        pass
    assert merged.strip() == run.trace.text.strip()
    assert merged != plain  # all pairs from layer 4 of 30 on: the answer changes


def test_a_fresh_forward_with_offset_positions_is_told_so_not_about_a_cache(model):
    # No merged cache before the call (none, or an empty one): the wrong start is the caller's positions or mask.
    ids = random_ids(20, seed=9)
    with slerpviz.merging(model, MergeSettings(cutoffs=(2,))), torch.no_grad():
        for cache in (None, DynamicCache(config=model.config)):
            with pytest.raises(ValueError, match="starts a new sequence under merging .* position_ids start at 5: "
                                                 "a sequence fed without a merged cache starts at position 0") as error:
                model(ids, position_ids=torch.arange(5, 25)[None], cache=cache, use_cache=cache is not None)
            assert "holds" not in str(error.value) and "continue" not in str(error.value)
        with pytest.raises(ValueError, match="attention mask covers 23 tokens for the 20 fed"):
            model(ids, attention_mask=torch.ones(1, 23, dtype=torch.long), use_cache=False)
        model(ids, position_ids=torch.arange(20)[None], logits_to_keep=1)  # from 0: accepted


def test_a_compiled_prefill_under_the_patch_gives_the_engines_tokens(fresh_dynamo):
    # Inductor itself, on one tiny model: the patch's prompt through compiled layers and merges, the new tokens as
    # generate feeds them, dynamic and static; and a cache the caller made without a config, whose layers the compiled
    # prefill makes first.
    model = tiny_model("llama")
    ids = random_ids(30, seed=2)
    for settings in (SETTINGS[0], SETTINGS[-1]):
        with slerpviz.merging(model, settings, compile_prefill=True):
            assert model.model.forward.engine.compiled_prefill
            patched = plain_generate(model, ids)
            cache = DynamicCache()
            with torch.no_grad():
                model(ids, cache=cache, use_cache=True, logits_to_keep=1)
                static = model.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0,
                                        cache_implementation="static")[0, ids.shape[1]:].tolist()
        assert patched == static == engine_tokens(model, ids, settings)
        assert len(cache.layers) == N_LAYERS and cache.layers[-1].get_seq_length() < ids.shape[1]
