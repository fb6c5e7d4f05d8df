"""The engine on tiny Mistral, Llama and Qwen2 models built from configs: exact where it must be exact."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import TINY, random_ids, tiny_engine, word_tokenizer
from slerpviz.engine import MergeSettings, MergingEngine, Sampling, interleave

N_LAYERS = TINY["num_hidden_layers"]


def hf_last_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[:, -1].float()


def prefilled(engine, ids, settings, cached=False, stages=None):
    """Next-token logits, layout and pair cosines of a prefill (with a cache or without)."""
    session = engine.prefill(ids, settings, cached, stages)
    return session.logits, session.layout, session.cosines


def greedy(engine, ids, settings, n, mode="cached"):
    run = engine.start(ids, settings, Sampling(max_new_tokens=n), mode)
    return [step.token_id for step in run], run


# --------------------------------------------------------------------------------------------- no merge = the model


@pytest.mark.parametrize("settings", [MergeSettings(), MergeSettings(cutoffs=(N_LAYERS,))], ids=["empty", "cutoff=N"])
def test_without_merging_the_engine_is_the_model(engine, settings):
    ids = random_ids(23)
    logits, _, _ = prefilled(engine, ids, settings)
    torch.testing.assert_close(logits, hf_last_logits(engine.model, ids), atol=1e-5, rtol=1e-5)

    tokens, _ = greedy(engine, ids, settings, 12)
    reference = engine.model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, ids.shape[1]:]
    stop = tokens.index(2) + 1 if 2 in tokens else len(tokens)  # the engine stops at EOS, generate was told not to
    assert tokens == reference.tolist()[:stop]


def test_without_merging_cached_decode_logits_match_a_full_forward(engine):
    ids = random_ids(17, seed=3)
    n = 6
    tokens, run = greedy(engine, ids, MergeSettings(), n + 1)
    full = torch.cat([ids, torch.tensor([tokens[:n]])], dim=1)
    cached = _rewound(run).decode(full[:, -1:])
    torch.testing.assert_close(cached, hf_last_logits(engine.model, full), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_eager_and_sdpa_agree_after_merging(attn):
    ids = random_ids(40, seed=5)
    settings = MergeSettings(cutoffs=(2, 4), keep_start=3, keep_end=2)
    reference, _, _ = prefilled(tiny_engine("llama", "eager"), ids, settings)
    logits, _, _ = prefilled(tiny_engine("llama", attn), ids, settings)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- cached vs recompute


SETTINGS = [
    MergeSettings(cutoffs=(3,)),
    MergeSettings(cutoffs=(0,), keep_start=4, keep_end=3, positions="first"),
    MergeSettings(cutoffs=(2, 4), keep_start=2, method="lerp", positions="renumber"),
    MergeSettings(cutoffs=(1, 1, 5), keep_end=5, method="seed-2024"),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s.cutoffs}-{s.method}-{s.positions}")
def test_cached_and_recompute_give_the_same_prefill(engine, settings):
    ids = random_ids(31, seed=1)
    cached, _, _ = prefilled(engine, ids, settings, cached=True)
    recomputed, _, _ = prefilled(engine, ids, settings)
    torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=1e-5)
    first_cached, _ = greedy(engine, ids, settings, 1, "cached")
    first_recomputed, _ = greedy(engine, ids, settings, 1, "recompute")
    assert first_cached == first_recomputed


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s.cutoffs}-{s.method}-{s.positions}")
def test_cache_lengths_follow_the_plan(engine, settings):
    ids = random_ids(29, seed=2)
    n = 7
    run = engine.start(ids, settings, Sampling(max_new_tokens=n + 1))
    for _ in range(n + 1):  # the first step is the prefill, each further one feeds one token
        next(run)
    planned = run.trace.seq_len_per_layer
    lengths = run.session.kv_lengths()
    assert lengths == [p + n for p in planned]
    assert planned[-1] < ids.shape[1]  # the plan did shorten the later layers
    head_bytes = 2 * TINY["num_key_value_heads"] * (TINY["hidden_size"] // TINY["num_attention_heads"]) * 4
    assert run.trace.kv_bytes_per_layer == [head_bytes * length for length in lengths]


# seed-2024 normalises by the whole sequence, so appending tokens changes its merge: it has no such identity.
@pytest.mark.parametrize("settings", [s for s in SETTINGS if s.method != "seed-2024"]
                         + [MergeSettings(cutoffs=(1, 1, 5))],
                         ids=lambda s: f"{s.cutoffs}-{s.method}-{s.positions}")
def test_cached_decoding_equals_a_full_pass_with_the_prompt_plan_kept(engine, settings):
    """The cached semantics, checked without a cache: the prompt merged as planned, new tokens appended unmerged.

    Keeping `keep_end` larger by the number of new tokens reproduces exactly that plan over the longer sequence.
    """
    ids = random_ids(26, seed=4)
    n = 5
    tokens, run = greedy(engine, ids, settings, n + 1)
    full = torch.cat([ids, torch.tensor([tokens[:n]])], dim=1)
    kept = MergeSettings(settings.cutoffs, settings.keep_start, max(settings.keep_end, 1) + n, settings.method,
                         settings.positions)
    reference, _, _ = prefilled(engine, full, kept)
    cached = _rewound(run).decode(full[:, -1:])
    torch.testing.assert_close(cached, reference, atol=1e-4, rtol=1e-4)


def _rewound(run):
    """The run's session without its last fed token, so the last decode step can be replayed and compared."""
    session = run.session
    for layer in session.cache.layers:
        layer.keys, layer.values = layer.keys[:, :, :-1], layer.values[:, :, :-1]
    session.length -= 1
    return session


# ------------------------------------------------------------------------------------------------ sampling, trace


def test_sampling_is_reproducible_with_a_seed_and_varies_without():
    engine = tiny_engine("mistral")
    ids = random_ids(12)
    settings = MergeSettings(cutoffs=(3,))

    def sample(seed):
        return [s.token_id for s in engine.start(ids, settings, Sampling(20, temperature=1.5, top_p=0.95, seed=seed))]

    assert sample(7) == sample(7)
    assert len({tuple(sample(seed)) for seed in range(4)}) > 1


def test_generation_stops_at_eos():
    engine = tiny_engine("llama")
    ids = random_ids(10)
    tokens, _ = greedy(engine, ids, MergeSettings(), 40)
    eos = tokens[5]
    engine.eos_ids = {eos}
    stopped, run = greedy(engine, ids, MergeSettings(), 40)
    assert stopped == tokens[: tokens.index(eos) + 1]
    assert run.trace.finished


def test_trace_records_plan_shapes_and_timings():
    engine = tiny_engine("qwen2")
    ids = random_ids(30)
    settings = MergeSettings(cutoffs=(2, 4), keep_start=3, keep_end=4)
    tokens, run = greedy(engine, ids, settings, 5)
    trace = run.trace
    assert trace.cutoffs == [2, 4]
    assert len(trace.tokens) == 30
    lengths = [len(groups) for groups in trace.slot_tokens]
    assert trace.seq_len_per_layer == [30, 30, lengths[0], lengths[0], lengths[1], lengths[1]]
    assert lengths[0] < 30 and lengths[1] < lengths[0]
    assert [len(c) for c in trace.pair_cosines] == [30 - lengths[0], lengths[0] - lengths[1]]  # one per merged pair
    assert all(-1 <= c <= 1 for stage in trace.pair_cosines for c in stage)
    assert trace.protected[0][:3] == [True] * 3 and trace.protected[0][-4:] == [True] * 4
    assert trace.prefill_s > 0 and len(trace.decode_s) == len(tokens) - 1
    assert trace.generated_ids == tokens
    assert trace.text == engine.tokenizer.decode(tokens, skip_special_tokens=True)


def test_interleave_advances_runs_in_turn_until_both_finish():
    engine = tiny_engine("llama")
    ids = random_ids(10)
    short = engine.start(ids, MergeSettings(), Sampling(max_new_tokens=2))
    long = engine.start(ids, MergeSettings(cutoffs=(3,)), Sampling(max_new_tokens=4))
    rounds = list(interleave(short, long))
    assert len(rounds) == 4
    assert [a is None for a, _ in rounds] == [False, False, True, True]
    assert all(b is not None for _, b in rounds)


# ------------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "settings, sampling, message",
    [
        (MergeSettings(cutoffs=(-1,)), Sampling(), "cutoff -1 is out of range: choose a layer from 0 to 6"),
        (MergeSettings(cutoffs=(7,)), Sampling(), "cutoff 7 is out of range"),
        (MergeSettings(keep_start=-2), Sampling(), "must not be negative"),
        (MergeSettings(keep_start=10, keep_end=11), Sampling(), "longer than the prompt"),
        (MergeSettings(method="average"), Sampling(), "unknown merge method 'average'; choose one of slerp"),
        (MergeSettings(positions="last"), Sampling(), "unknown positions mode 'last'"),
        (MergeSettings(), Sampling(max_new_tokens=0), "at least 1"),
        (MergeSettings(), Sampling(temperature=-1), "temperature"),
        (MergeSettings(), Sampling(top_p=0), "top-p"),
        (MergeSettings(), Sampling(max_new_tokens=600), "longer than the model's context of 512 tokens"),
        (MergeSettings(cosine_share=1.5), Sampling(), r"cosine share must be a number from 0 to 1 \(got 1.5\)"),
        (MergeSettings(cosine_share=float("nan")), Sampling(), r"cosine share must be a number from 0 to 1 \(got na"),
        (MergeSettings(attention_window=0), Sampling(), r"attention window must be a whole number, 1 or more"),
        (MergeSettings(attention_keep=2.5), Sampling(), r"attention keep must be a whole number, 0 or more"),
        (MergeSettings(attention_reach=-1), Sampling(), r"attention reach must be a whole number from 0 to 256"),
        (MergeSettings(attention_reach=10**9), Sampling(), r"attention reach must be a whole number from 0 to 256"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(settings, sampling, message):
    engine = tiny_engine("mistral")
    with pytest.raises(ValueError, match=message):
        engine.start(random_ids(20), settings, sampling)


def test_bad_mode_and_empty_prompt_are_refused():
    engine = tiny_engine("mistral")
    with pytest.raises(ValueError, match="unknown mode 'lazy'"):
        engine.start(random_ids(20), MergeSettings(), Sampling(), mode="lazy")
    for prompt in ("", "   \n"):
        with pytest.raises(ValueError, match="the prompt is empty"):
            engine.encode(prompt)


def test_a_model_of_another_family_is_refused():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="family 'gpt2' is not supported; slerpviz runs mistral, llama, qwen2"):
        MergingEngine(model, word_tokenizer())



def test_models_off_the_allow_list_are_refused_before_any_download():
    from slerpviz.models import load

    with pytest.raises(ValueError, match="not on the allow-list"):
        load("gpt2")
    with pytest.raises(ValueError, match="not on the allow-list"):
        load("someone/evil-remote-code-model")


# ------------------------------------------------- choosing pairs, proportional attention, size-weighted merging


FRONTIER_SETTINGS = [
    MergeSettings(cutoffs=(2,), ratio=0.5, choice="similar"),
    MergeSettings(cutoffs=(1, 4), ratio=(1.0, 0.5), choice="uniform", proportional=True, keep_start=2),
    MergeSettings(cutoffs=(3,), choice="similar", proportional=True, method="slerp-dir", keep_end=3),
]


def test_ratio_one_consecutive_without_proportional_attention_is_the_plain_merge_bit_for_bit(engine):
    ids = random_ids(33, seed=9)
    plain, _, _ = prefilled(engine, ids, MergeSettings(cutoffs=(3,), keep_start=2))
    explicit, _, _ = prefilled(engine, ids, MergeSettings(cutoffs=(3,), keep_start=2, ratio=1.0,
                                                              choice="consecutive", proportional=False))
    assert torch.equal(plain, explicit)


@pytest.mark.parametrize("settings", FRONTIER_SETTINGS, ids=lambda s: f"{s.choice}-{s.ratio}-{s.proportional}")
def test_cached_decoding_with_chosen_pairs_equals_a_full_pass(engine, settings):
    ids = random_ids(30, seed=6)
    n = 4
    tokens, run = greedy(engine, ids, settings, n + 1)
    full = torch.cat([ids, torch.tensor([tokens[:n]])], dim=1)
    kept = MergeSettings(settings.cutoffs, settings.keep_start, max(settings.keep_end, 1) + n, settings.method,
                         settings.positions, settings.ratio, settings.choice, settings.proportional)
    reference, layout, _ = prefilled(engine, full, kept)
    assert [s.slot_tokens for s in layout.stages] == [[g for g in s.slot_tokens] + [(p,) for p in range(30, 30 + n)]
                                                 for s in run.session.stages]
    cached = _rewound(run).decode(full[:, -1:])
    torch.testing.assert_close(cached, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("settings", FRONTIER_SETTINGS, ids=lambda s: f"{s.choice}-{s.ratio}-{s.proportional}")
def test_cached_and_recompute_agree_with_chosen_pairs(engine, settings):
    ids = random_ids(27, seed=8)
    cached, _, _ = prefilled(engine, ids, settings, cached=True)
    recomputed, _, _ = prefilled(engine, ids, settings)
    torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=1e-5)


def test_proportional_attention_works_with_eager_and_sdpa_and_changes_the_result():
    ids = random_ids(36, seed=2)
    settings = MergeSettings(cutoffs=(1, 3), proportional=True)
    eager, _, _ = prefilled(tiny_engine("mistral", "eager"), ids, settings)
    sdpa, _, _ = prefilled(tiny_engine("mistral", "sdpa"), ids, settings)
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)
    plain, _, _ = prefilled(tiny_engine("mistral", "sdpa"), ids, MergeSettings(cutoffs=(1, 3)))
    assert not torch.allclose(plain, sdpa, atol=1e-4)


@pytest.mark.parametrize("attn", ["flex_attention", "flash_attention_2"])
def test_proportional_attention_is_refused_where_the_mask_is_not_a_tensor(attn):
    """Its bias is added to the attention mask; flex attention's is a BlockMask, flash attention's none at all."""
    engine = tiny_engine("mistral", "flex_attention")  # a real model on that path (flex runs on the CPU)
    engine.model.config._attn_implementation = attn
    ids = random_ids(24, seed=2)
    with pytest.raises(ValueError, match=f"proportional attention needs sdpa or eager attention .* runs '{attn}'"):
        engine.start(ids, MergeSettings(cutoffs=(1, 3), proportional=True), Sampling(max_new_tokens=2))
    import slerpviz

    with pytest.raises(ValueError, match="proportional attention needs sdpa or eager attention"):
        slerpviz.apply(engine.model, MergeSettings(cutoffs=(2,), proportional=True))
    assert "forward" not in engine.model.model.__dict__
    engine.start(ids, MergeSettings(cutoffs=(1, 3)), Sampling(max_new_tokens=2))  # without the bias: accepted


def test_a_runs_trace_records_the_stages_its_prefill_ran():
    engine = tiny_engine("llama")
    ids = random_ids(40, seed=6)
    settings = MergeSettings(cutoffs=(4, 2), ratio=(1.0, 0.5), keep_start=2, keep_end=3)
    run = engine.start(ids, settings, Sampling(max_new_tokens=2))
    assert run.trace.plan_pending and run.trace.slot_tokens == []  # a run plans nothing ahead: its prefill plans
    list(run)
    assert run.trace.slot_tokens == [[list(g) for g in stage.slot_tokens] for stage in run.session.stages]
    assert run.trace.cutoffs == [2, 4] and run.trace.seq_len_per_layer[2] == 40 - 9  # half of 18 eligible pairs
    preview = engine.new_trace(ids, settings)  # the page's preview, before the prefill
    assert preview.slot_tokens == run.trace.slot_tokens and preview.seq_len_per_layer == run.trace.seq_len_per_layer


@pytest.mark.parametrize("choice", ["consecutive", "similar", "attention"])
def test_merge_only_plans_as_the_prefill_does_at_its_cutoff(choice):
    """What the speed benchmark times as the merge is the prefill's own merge, scoring included."""
    engine = tiny_engine("qwen2")
    ids = random_ids(40, seed=7)
    settings = MergeSettings(cutoffs=(3,), ratio=0.5, choice=choice, attention_window=4, attention_keep=3)
    session = engine.prefill(ids, settings)
    with torch.no_grad():
        entering = engine.model(ids, output_hidden_states=True).hidden_states[3]  # what enters layer 3
    layout = engine.merge_only(entering, settings)
    assert [stage.slot_tokens for stage in layout.stages] == [stage.slot_tokens for stage in session.stages]
    assert len(layout.stages[0].slot_tokens) < 40


def test_similar_pairs_are_planned_at_the_cutoff_and_recorded():
    engine = tiny_engine("qwen2")
    ids = random_ids(40, seed=4)
    settings = MergeSettings(cutoffs=(2, 4), ratio=0.6, choice="similar", keep_start=3, keep_end=4)
    run = engine.start(ids, settings, Sampling(max_new_tokens=2))
    assert run.trace.plan_pending and run.trace.slot_tokens == []
    list(run)
    trace = run.trace
    assert not trace.plan_pending and len(trace.slot_tokens) == 2
    for groups, sizes in zip(trace.slot_tokens, trace.slot_sizes):
        assert sum(sizes) == 40 and [len(g) for g in groups] == sizes
        for position in [0, 1, 2, 36, 37, 38, 39]:
            assert [position] in groups
    assert trace.seq_len_per_layer[2] == len(trace.slot_tokens[0]) < 40
    again = engine.start(ids, settings, Sampling(max_new_tokens=2))
    list(again)
    assert again.trace.slot_tokens == trace.slot_tokens  # deterministic for the same input


def test_bad_ratio_and_choice_are_refused():
    engine = tiny_engine("llama")
    with pytest.raises(ValueError, match="unknown pair choice 'best'"):
        engine.start(random_ids(20), MergeSettings(cutoffs=(2,), choice="best"))
    with pytest.raises(ValueError, match="merge ratio 2 must be between 0 and 1"):
        engine.start(random_ids(20), MergeSettings(cutoffs=(2,), ratio=2))
    with pytest.raises(ValueError, match="3 merge ratios for 2 cutoffs"):
        engine.start(random_ids(20), MergeSettings(cutoffs=(2, 3), ratio=(1.0, 0.5, 0.2)))


def test_per_cutoff_ratios_follow_their_cutoffs(engine):
    """Cutoffs are run in layer order; each ratio stays with the cutoff it was given for."""
    given = MergeSettings(cutoffs=(4, 2), ratio=(1.0, 0.5))
    assert given.cutoffs == (2, 4) and given.ratio == (0.5, 1.0)
    ids = random_ids(41)
    stages = engine.plan(ids, given)
    sorted_first = engine.plan(ids, MergeSettings(cutoffs=(2, 4), ratio=(0.5, 1.0)))
    assert [s.plan.merged_length for s in stages] == [s.plan.merged_length for s in sorted_first]
    assert stages[0].plan.merged_length == 41 - 10  # half of the 19 eligible pairs, rounded


def test_sampling_that_no_model_can_use_is_refused():
    from slerpviz.engine import check_sampling

    for sampling, field in [(Sampling(temperature=float("inf")), "temperature"),
                            (Sampling(temperature=float("nan")), "temperature"), (Sampling(seed=-5), "seed"),
                            (Sampling(seed=2**70), "seed"), (Sampling(max_new_tokens=0), "max new tokens"),
                            (Sampling(top_p=float("nan")), "top-p")]:
        with pytest.raises(ValueError, match=field):
            check_sampling(sampling)
    check_sampling(Sampling(temperature=0.7, top_p=0.9, seed=2**62))


# ------------------------------------------------------------------------- the attention choice: merge what is ignored

ATTENTION_SETTINGS = [
    MergeSettings(cutoffs=(2,), ratio=0.5, choice="attention", attention_window=4, attention_keep=0),
    MergeSettings(cutoffs=(1, 4), ratio=(0.75, 0.5), choice="attention", attention_window=6, attention_keep=3,
                  keep_start=2, keep_end=2, method="lerp", positions="first", proportional=True, cosine_share=0.5),
    MergeSettings(cutoffs=(3,), choice="attention", attention_keep=2, method="slerp-dir", positions="renumber"),
    MergeSettings(cutoffs=(2, 4), ratio=(0.5, 1.0), choice="attention", attention_window=8, attention_keep=4,
                  attention_reach=3),
    MergeSettings(cutoffs=(0, 3), ratio=0.6, choice="attention", method="seed-2024", attention_window=50,
                  attention_keep=0),
]


def _label(s):
    return (f"{s.cutoffs}-{s.method}-{s.positions}-W{s.attention_window}-keep{s.attention_keep}-"
            f"reach{s.attention_reach}-cos{s.cosine_share:g}")


@pytest.mark.parametrize("cutoff", [0, 2, N_LAYERS - 1])
def test_attention_score_is_softmax_of_q_dot_k_from_the_layer_itself(engine, cutoff):
    """The score equals the attention weights transformers' own eager attention computes at that layer, averaged
    over heads and the last W queries."""
    eager = MergingEngine(engine.model, engine.tokenizer)
    engine.model.config._attn_implementation = "eager"
    try:
        ids = random_ids(29, seed=12)
        with torch.no_grad():
            out = engine.model(ids, output_hidden_states=True, output_attentions=True)
        window = 7
        reference = out.attentions[cutoff][0, :, -window:, :].float().mean(dim=(0, 1))
        with torch.inference_mode():
            score = eager.attention_received(cutoff, out.hidden_states[cutoff], torch.arange(29.0), window)
    finally:
        engine.model.config._attn_implementation = "sdpa"
    torch.testing.assert_close(score, reference, atol=1e-5, rtol=1e-4)
    assert score.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_the_most_attended_tokens_are_never_merged():
    engine = tiny_engine("llama")
    ids = random_ids(48, seed=13)
    settings = MergeSettings(cutoffs=(2,), choice="attention", attention_keep=5, attention_window=8)
    _, layout, _ = prefilled(engine, ids, settings)
    scores = layout.attention[0]
    top = set(scores.topk(5).indices.tolist())
    merged = {i for g in layout.stages[0].slot_tokens if len(g) == 2 for i in g}
    assert merged and not top & merged
    alone = MergeSettings(cutoffs=(2,), choice="attention", attention_window=8, attention_keep=0)
    _, unprotected, _ = prefilled(engine, ids, alone)
    assert top & {i for g in unprotected.stages[0].slot_tokens if len(g) == 2 for i in g}  # the budget did something


def test_the_kept_budget_grows_with_the_prompt_at_every_stage():
    from slerpviz.pairs import choose_pairs

    assert MergeSettings(attention_keep=4, attention_keep_share=0.25).kept_budget(8) == 4  # short: the floor
    assert MergeSettings(attention_keep=4, attention_keep_share=0.25).kept_budget(48) == 12
    engine = tiny_engine("llama")
    ids = random_ids(48, seed=13)
    settings = MergeSettings(cutoffs=(1, 3), ratio=(0.5, 1.0), choice="attention", attention_window=8,
                             attention_keep=4, attention_keep_share=0.25)
    _, layout, _ = prefilled(engine, ids, settings)
    # At each stage (the second over about 36 slots) twelve, a quarter of the 48 prompt tokens, never merge.
    for stage, received, ratio in zip(layout.stages, layout.attention, (0.5, 1.0)):
        plan = stage.plan
        assert plan.starts[plan.sizes == 2].tolist() == choose_pairs(
            received.numel(), ratio=ratio, choice="attention", attention=received, keep_top=12).tolist()
    fixed = MergeSettings(cutoffs=(1, 3), ratio=(0.5, 1.0), choice="attention", attention_window=8, attention_keep=4)
    _, floor_only, _ = prefilled(engine, ids, fixed)
    assert floor_only.stages[-1].slot_tokens != layout.stages[-1].slot_tokens  # the share changed what merged


def test_reach_reaches_the_plan_and_the_trace_keeps_the_received_attention():
    from slerpviz.pairs import choose_pairs

    engine = tiny_engine("llama")
    ids = random_ids(48, seed=13)
    settings = MergeSettings(cutoffs=(2,), ratio=0.5, choice="attention", attention_window=8, attention_keep=4,
                             attention_reach=3)
    _, layout, _ = prefilled(engine, ids, settings)
    received = layout.attention[0]
    plan = layout.stages[0].plan
    expected = choose_pairs(48, ratio=0.5, choice="attention", attention=received, keep_top=4, reach=3)
    assert plan.starts[plan.sizes == 2].tolist() == expected.tolist()
    _, alone, _ = prefilled(engine, ids, MergeSettings(cutoffs=(2,), ratio=0.5, choice="attention",
                                                       attention_window=8, attention_keep=4))
    torch.testing.assert_close(alone.attention[0], received)  # what each token received, whatever the reach
    assert alone.stages[0].slot_tokens != layout.stages[0].slot_tokens  # the reach changed which pairs merge


def _extended(stages, length, n):
    """The same merges over the prompt followed by n tokens that stay alone (what a cached decode step sees)."""
    from slerpviz.pairs import Stage, plan_from_pairs

    first = last = torch.arange(length + n)
    out = []
    for stage in stages:
        pairs = stage.plan.starts[stage.plan.sizes == 2]
        plan = plan_from_pairs(first.numel(), pairs, stage.plan.keep_start, stage.plan.keep_end + n, last - first + 1)
        out.append(Stage(stage.cutoff, plan, first[plan.starts], last[plan.starts + plan.sizes - 1]))
        first, last = out[-1].first, out[-1].last
    return out


# seed-2024 divides by the norm of the whole sequence, which the appended tokens change: no full pass equals it.
@pytest.mark.parametrize("settings", [s for s in ATTENTION_SETTINGS if s.method != "seed-2024"], ids=_label)
def test_cached_decoding_with_attention_choice_equals_a_full_pass(engine, settings):
    ids = random_ids(30, seed=6)
    n = 4
    tokens, run = greedy(engine, ids, settings, n + 1)
    full = torch.cat([ids, torch.tensor([tokens[:n]])], dim=1)
    reference, _, _ = prefilled(engine, full, settings, stages=_extended(run.session.stages, 30, n))
    cached = _rewound(run).decode(full[:, -1:])
    torch.testing.assert_close(cached, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("settings", ATTENTION_SETTINGS, ids=_label)
def test_cached_and_recompute_agree_with_attention_choice(engine, settings):
    ids = random_ids(27, seed=8)
    cached, layout, _ = prefilled(engine, ids, settings, cached=True)
    recomputed, again, _ = prefilled(engine, ids, settings)
    torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=1e-5)
    assert [s.slot_tokens for s in layout.stages] == [s.slot_tokens for s in again.stages]
    assert all(a is not None and a.shape[0] == (27 if i == 0 else len(layout.stages[i - 1].slot_tokens))
               for i, a in enumerate(layout.attention))


def test_attention_choice_records_its_plan_and_scores_in_the_trace():
    engine = tiny_engine("mistral")
    ids = random_ids(40, seed=4)
    run = engine.start(ids, ATTENTION_SETTINGS[1], Sampling(max_new_tokens=3), "recompute")
    assert run.trace.plan_pending
    list(run)
    trace = run.trace
    assert not trace.plan_pending and len(trace.slot_tokens) == 2 and len(trace.attention_scores) == 2
    assert len(trace.attention_scores[0]) == 40  # scored over the prompt at the first step
    assert trace.seq_len_per_layer[1] == len(trace.slot_tokens[0]) < 40


# --------------------------------------------------------------------------------- sliding-window attention layers


def _sliding_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**TINY, use_sliding_window=True, sliding_window=8, max_window_layers=3,
                         attn_implementation="sdpa")
    assert "sliding_attention" in config.layer_types and "full_attention" in config.layer_types
    return MergingEngine(Qwen2ForCausalLM(config).eval(), word_tokenizer())


def test_sliding_window_layers_without_merging_are_the_model():
    """Every attention type's mask is built before the segment's layers write their caches."""
    engine = _sliding_qwen2()
    ids = random_ids(20)
    tokens, _ = greedy(engine, ids, MergeSettings(), 6)
    reference = engine.model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, 20:]
    stop = tokens.index(2) + 1 if 2 in tokens else len(tokens)
    assert tokens == reference.tolist()[:stop]


def test_sliding_window_layers_merge_and_refuse_proportional_attention():
    engine = _sliding_qwen2()
    ids = random_ids(24, seed=3)
    settings = MergeSettings(cutoffs=(2, 4), ratio=0.5, choice="attention", attention_window=4, attention_keep=0)
    cached, _, _ = prefilled(engine, ids, settings, cached=True)
    recomputed, _, _ = prefilled(engine, ids, settings)
    torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=1e-5)
    assert len(greedy(engine, ids, settings, 4)[0]) >= 1
    with pytest.raises(ValueError, match="proportional attention is not supported"):
        engine.start(ids, MergeSettings(cutoffs=(2,), proportional=True))


@pytest.mark.parametrize("version, refused", [
    ("5.24.0", False), ("5.30.1", False), ("5.18.0", True), ("4.57.1", True), ("6.0.0", True), ("6.0.0.dev0", True),
])
def test_transformers_outside_the_tested_range_is_refused_at_import(version, refused):
    from slerpviz.engine import check_transformers_version

    if refused:
        with pytest.raises(ImportError, match=f"needs transformers >=5.24,<6.0; this environment has {version}"):
            check_transformers_version(version)
    else:
        check_transformers_version(version)


def test_a_set_interrupt_stops_the_step_under_way_at_the_next_layer():
    import threading

    from slerpviz.engine import Interrupted

    engine = tiny_engine("llama")
    stop = threading.Event()
    layers_run = []
    armed = []  # the event the engine checked while each layer ran

    def after_layer(module, args, output):
        layers_run.append(module)
        armed.append(engine._interrupt)
        if len(layers_run) == 3:
            stop.set()  # Stop pressed while the third layer runs

    hooks = [layer.register_forward_hook(after_layer) for layer in engine.decoder.layers]
    try:
        run = engine.start(random_ids(30), MergeSettings(cutoffs=(2,)), Sampling(max_new_tokens=4), interrupt=stop)
        with pytest.raises(Interrupted):
            next(run)
        assert len(layers_run) == 3 < engine.num_layers and engine._interrupt is None
        stop.clear()
        del armed[:]  # (layers_run keeps counting: the hook presses Stop at the third layer only)
        # An interrupt never set changes nothing, on the path that checks it: every layer ran with it armed.
        run = engine.start(random_ids(30), MergeSettings(cutoffs=(2,)), Sampling(max_new_tokens=2), interrupt=stop)
        steps = [next(run), next(run)]
        assert next(run, None) is None and len(steps) == 2
        assert len(armed) == 2 * engine.num_layers and all(event is stop for event in armed)
        assert engine._interrupt is None
    finally:
        for hook in hooks:
            hook.remove()


def test_a_for_loop_over_a_run_stops_when_its_interrupt_is_set():
    import threading

    from slerpviz.engine import Interrupted

    engine = tiny_engine("llama")
    stop = threading.Event()
    run = engine.start(random_ids(30), MergeSettings(cutoffs=(2,)), Sampling(max_new_tokens=4), interrupt=stop)
    steps = []
    with pytest.raises(Interrupted):
        for step in run:
            steps.append(step)
            stop.set()  # Stop pressed after the first token
    assert len(steps) == 1 and engine._interrupt is None
    stop.clear()
    assert len(list(engine.start(random_ids(30), MergeSettings(cutoffs=(2,)), Sampling(max_new_tokens=3),
                                 interrupt=stop))) == 3  # list() goes the same way and runs to the end


@pytest.mark.parametrize("choice", ["consecutive", "attention"])
def test_dropping_at_layer_0_with_renumbered_positions_is_the_model_run_on_the_kept_tokens(engine, choice):
    # `drop` is token pruning: from the cutoff on, the second member of each chosen pair is gone. At layer 0, with
    # the kept tokens renumbered 0..k-1, that is exactly the unmerged model run on the kept tokens alone.
    ids = random_ids(40, seed=4)
    settings = MergeSettings(cutoffs=(0,), method="drop", positions="renumber", choice=choice, ratio=0.5,
                             attention_keep=4)
    pruned = engine.prefill(ids, settings)
    (stage,) = pruned.stages
    kept = stage.first.cpu()
    assert kept.numel() < 40 and torch.equal(stage.first, stage.plan.starts)  # one stage: slots start at tokens
    alone = engine.prefill(ids[:, kept], MergeSettings())
    torch.testing.assert_close(pruned.logits, alone.logits)


def test_proportional_attention_is_refused_with_drop(engine):
    with pytest.raises(ValueError, match="a dropped pair keeps one: use it with a merge method"):
        engine.start(random_ids(20), MergeSettings(cutoffs=(2,), method="drop", proportional=True))


@pytest.mark.parametrize("choice", ["consecutive", "attention"])
def test_a_recent_window_is_keep_end_where_the_prompt_holds_it_and_all_of_a_shorter_one(choice):
    """keep_recent fits any prompt (the recommended preset carries it); keep_end, a span the user asked for, must
    fit."""
    engine = tiny_engine("llama")
    ids = random_ids(30, seed=7)
    spans = dict(cutoffs=(2, 4), ratio=(0.5, 1.0), choice=choice, keep_start=3, attention_keep=4)
    recent = engine.prefill(ids, MergeSettings(**spans, keep_recent=6))
    end = engine.prefill(ids, MergeSettings(**spans, keep_end=6))
    assert recent.kv_lengths() == end.kv_lengths() and min(recent.kv_lengths()) < 30
    torch.testing.assert_close(recent.logits, end.logits)
    assert engine.prefill(ids, MergeSettings(**spans, keep_end=4, keep_recent=6)).kv_lengths() == end.kv_lengths()
    short = engine.prefill(ids[:, :8], MergeSettings(**spans, keep_recent=6))  # 3 + 6 > 8: the window takes 5
    assert short.kv_lengths() == [8] * engine.num_layers
    torch.testing.assert_close(short.logits, engine.prefill(ids[:, :8]).logits)
    with pytest.raises(ValueError, match="longer than the prompt"):
        engine.prefill(ids[:, :8], MergeSettings(**spans, keep_end=6))
