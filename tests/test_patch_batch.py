"""A batch under the patch: prompts padded on the left, beams, several return sequences, pipelines with a batch size,
and a static cache. Each row must come out as it does alone under the same merging (which test_patch.py holds to the
engine)."""

import pytest
import torch
from transformers import DynamicCache, MistralConfig, MistralForCausalLM, pipeline

import slerpviz
from slerpviz import decode
from conftest import FAMILIES, TINY, random_ids, tiny_model
from test_patch import SETTINGS  # the settings the patch is held to the engine under
from slerpviz.engine import MergeSettings
from slerpviz.presets import recommended

NEW = 6


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts [1, n] as one batch padded on the left with 0s, and its mask."""
    length = max(row.shape[1] for row in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        ids[index, length - row.shape[1]:] = row[0]
        mask[index, length - row.shape[1]:] = 1
    return ids, mask


def greedy(model, ids, mask, n=NEW, **options):
    """Greedy tokens [B, n] and each step's scores [B, n, vocab], with no EOS stop."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0, output_scores=True, return_dict_in_generate=True, **options)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.scores, 1)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s.cutoffs}-{s.choice}-{s.proportional}")
def test_each_row_of_a_left_padded_batch_generates_as_it_does_alone(model, settings):
    rows = [random_ids(length, seed=10 + index) for index, length in enumerate((30, 22, 27))]
    ids, mask = left_padded(rows)
    with slerpviz.merging(model, settings), torch.no_grad():
        alone = [greedy(model, row, torch.ones_like(row)) for row in rows]
        tokens, scores = greedy(model, ids, mask)
        cache = DynamicCache(config=model.config)
        model(ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
    for index, (own_tokens, own_scores) in enumerate(alone):
        assert tokens[index].tolist() == own_tokens[0].tolist()
        torch.testing.assert_close(scores[index], own_scores[0], atol=1e-5, rtol=1e-5)
    assert cache.layers[-1].get_seq_length() < ids.shape[1]  # merged: the rows' longest merged cache is shorter


def test_a_batch_without_padding_and_a_padded_single_prompt_are_their_rows_alone(model):
    settings = SETTINGS[3]
    rows = [random_ids(24, seed=20 + index) for index in range(2)]
    with slerpviz.merging(model, settings), torch.no_grad():
        alone = [greedy(model, row, None) for row in rows]
        tokens, scores = greedy(model, torch.cat(rows), None)  # generate drops a mask of all 1s
        padded, mask = left_padded([rows[0], random_ids(29, seed=1)])
        single, single_scores = greedy(model, padded[:1], mask[:1])  # five tokens of padding before it
    for index in range(2):
        assert tokens[index].tolist() == alone[index][0][0].tolist()
        torch.testing.assert_close(scores[index], alone[index][1][0], atol=1e-5, rtol=1e-5)
    assert single[0].tolist() == alone[0][0][0].tolist()
    torch.testing.assert_close(single_scores[0], alone[0][1][0], atol=1e-5, rtol=1e-5)


def test_beams_and_several_return_sequences_of_a_batch_are_those_of_each_prompt_alone(model):
    rows = [random_ids(length, seed=30 + index) for index, length in enumerate((26, 19))]
    ids, mask = left_padded(rows)
    options = dict(max_new_tokens=NEW, num_beams=3, num_return_sequences=2, do_sample=False, eos_token_id=None,
                   pad_token_id=0)
    with slerpviz.merging(model, SETTINGS[3]), torch.no_grad():
        alone = torch.cat([model.generate(row, attention_mask=torch.ones_like(row), **options)[:, -NEW:]
                           for row in rows])
        together = model.generate(ids, attention_mask=mask, **options)[:, -NEW:]
    assert together.tolist() == alone.tolist()
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=mask, **options)[:, -NEW:]
    with slerpviz.merging(model, MergeSettings()), torch.no_grad():
        assert model.generate(ids, attention_mask=mask, **options)[:, -NEW:].tolist() == plain.tolist()


def test_a_whole_forward_of_a_batch_gives_each_rows_last_logits_and_refuses_rows_that_see_the_next_token(model):
    rows = [random_ids(length, seed=40 + index) for index, length in enumerate((25, 18))]
    ids, mask = left_padded(rows)
    settings = MergeSettings(cutoffs=(2,), keep_end=4)
    with slerpviz.merging(model, settings), torch.no_grad():
        alone = [model(row, use_cache=False, logits_to_keep=4).logits for row in rows]
        together = model(ids, attention_mask=mask, use_cache=False, logits_to_keep=4).logits
        with pytest.raises(ValueError, match="rows asked for would depend on a later token"):
            model(ids, attention_mask=mask, use_cache=False)
    for index in range(2):
        torch.testing.assert_close(together[index], alone[index][0], atol=1e-5, rtol=1e-5)


def test_a_sliding_window_batch_decodes_as_its_rows_alone_and_one_past_the_window_is_refused():
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=36, attn_implementation="sdpa")).eval()
    rows = [random_ids(length, seed=50 + index) for index, length in enumerate((30, 21))]
    ids, mask = left_padded(rows)
    settings = MergeSettings(cutoffs=(2,), ratio=0.5)
    with slerpviz.merging(model, settings), torch.no_grad():
        alone = [greedy(model, row, torch.ones_like(row), n=12) for row in rows]  # 30 + 12 tokens: past the window
        tokens, scores = greedy(model, ids, mask, n=12)
        for index in range(2):
            assert tokens[index].tolist() == alone[index][0][0].tolist()
            torch.testing.assert_close(scores[index], alone[index][1][0], atol=1e-5, rtol=1e-5)
        long, long_mask = left_padded([random_ids(40, seed=1), rows[1]])
        with pytest.raises(ValueError, match="outgrows a sliding-window layer's window"):
            model(long, attention_mask=long_mask, cache=DynamicCache(config=model.config), use_cache=True,
                  logits_to_keep=1)


def test_what_a_batch_cannot_do_is_refused_clearly(model):
    rows = [random_ids(length, seed=60 + index) for index, length in enumerate((16, 12))]
    ids, mask = left_padded(rows)
    with slerpviz.merging(model, MergeSettings(cutoffs=(2,))), torch.no_grad():
        empty = mask.clone()
        empty[1] = 0
        with pytest.raises(ValueError, match="all padding"):
            model(ids, attention_mask=empty)
        with pytest.raises(ValueError, match="position_ids other than each row's running count"):
            model(ids, attention_mask=mask, position_ids=torch.arange(16)[None].expand(2, 16))
        batch_cache, single_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
        model(ids, attention_mask=mask, cache=batch_cache, use_cache=True, logits_to_keep=1)
        model(rows[0], cache=single_cache, use_cache=True, logits_to_keep=1)
        with pytest.raises(ValueError, match="holds one sequence without padding"):
            model(torch.ones(2, 1, dtype=torch.long), attention_mask=torch.ones(2, 17, dtype=torch.long),
                  cache=single_cache, use_cache=True)
        turn = torch.cat([mask, torch.tensor([[1, 1, 1], [0, 1, 1]])], 1)  # a second turn, padded in the middle
        with pytest.raises(ValueError, match="padded before its prompts only"):
            model(torch.ones(2, 3, dtype=torch.long), attention_mask=turn, cache=batch_cache, use_cache=True)
        with pytest.raises(ValueError, match="running count"):  # each row's next token is at 16 and 12
            model(torch.ones(2, 1, dtype=torch.long), attention_mask=torch.cat([mask, mask[:, :1] * 0 + 1], 1),
                  position_ids=torch.tensor([[16], [16]]), cache=batch_cache, use_cache=True)


def test_the_embedded_model_generates_a_padded_batch_and_a_pipeline_batch_as_each_prompt_alone(embedded):
    model, tokenizer = embedded.model, embedded.tokenizer
    prompts = ["Name three rivers in Europe and say which is the longest.",
               "Write a short poem about the sea in winter, with four lines and a rhyme.", "What is 17 times 3?"]
    chats = [[{"role": "user", "content": prompt}] for prompt in prompts]
    texts = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with slerpviz.merging(model, recommended(model.config.num_hidden_layers)), torch.no_grad():
            alone = []
            for text in texts:
                encoded = tokenizer(text, return_tensors="pt")
                alone.append(model.generate(**encoded, **options)[0, encoded.input_ids.shape[1]:].tolist())
            batch = tokenizer(texts, return_tensors="pt", padding=True)
            together = model.generate(**batch, **options)[:, batch.input_ids.shape[1]:]
            generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
            replies = generator(chats, batch_size=3, **options)
    finally:
        tokenizer.padding_side = side
    assert len(set(batch.attention_mask.sum(-1).tolist())) == 3  # three lengths: two rows padded
    for index, tokens in enumerate(alone):
        assert together[index].tolist()[:len(tokens)] == tokens
        assert replies[index][0]["generated_text"][-1]["content"] == tokenizer.decode(tokens, skip_special_tokens=True)


def test_a_batch_cache_continued_by_several_tokens_gives_each_rows_logits_alone(model):
    rows = [random_ids(length, seed=70 + index) for index, length in enumerate((21, 15))]
    ids, mask = left_padded(rows)
    more = random_ids(6, seed=3).view(2, 3)
    settings = SETTINGS[1]
    with slerpviz.merging(model, settings), torch.no_grad():
        alone = []
        for index, row in enumerate(rows):
            cache = DynamicCache(config=model.config)
            model(row, cache=cache, use_cache=True, logits_to_keep=1)
            alone.append(model(more[index:index + 1], cache=cache, use_cache=True).logits)
        cache = DynamicCache(config=model.config)
        model(ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
        together = model(more, attention_mask=torch.cat([mask, torch.ones_like(more)], 1), cache=cache,
                         use_cache=True).logits
    for index in range(2):
        torch.testing.assert_close(together[index], alone[index][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s.cutoffs}-{s.choice}-{s.proportional}")
def test_a_batch_under_a_static_cache_decodes_on_the_static_decoder_as_under_the_dynamic_one(model, settings):
    rows = [random_ids(length, seed=80 + index) for index, length in enumerate((30, 22, 27))]
    ids, mask = left_padded(rows)
    with slerpviz.merging(model, settings), torch.no_grad():
        tokens, scores = greedy(model, ids, mask)
        static_tokens, static_scores = greedy(model, ids, mask, cache_implementation="static")
        assert model.model.forward.decode_path == "static"
        # the same batch again takes the decoder its first generate gave back to the pool, and gives it back
        engine = model.model.forward.engine

        def pooled():
            return [id(d) for idle in engine.__dict__[decode.POOL_ATTRIBUTE].values() for d in idle]

        before = pooled()
        again, _ = greedy(model, ids, mask, cache_implementation="static")
        assert len(before) == 1 and pooled() == before and again.tolist() == tokens.tolist()
    assert static_tokens.tolist() == tokens.tolist()
    torch.testing.assert_close(static_scores, scores, atol=1e-5, rtol=1e-5)


def test_a_batch_under_a_static_cache_on_a_sliding_window_model_is_refused():
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=36, attn_implementation="sdpa")).eval()
    ids, mask = left_padded([random_ids(12, seed=1), random_ids(9, seed=2)])
    with slerpviz.merging(model, MergeSettings(cutoffs=(2,))), torch.no_grad():
        with pytest.raises(ValueError, match="a batch under a static cache needs full-attention layers"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0, cache_implementation="static")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on one: pytest -k on_a_gpu)")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_on_a_gpu_a_batch_under_a_static_cache_replays_a_cuda_graph_with_the_dynamic_tokens(family):
    model = tiny_model(family).to("cuda")  # float32, so that a bf16 rounding cannot stand for a wrong path
    ids, mask = left_padded([random_ids(length, seed=90 + index) for index, length in enumerate((60, 41, 52))])
    ids, mask = ids.cuda(), mask.cuda()
    for settings in SETTINGS:
        with slerpviz.merging(model, settings), torch.no_grad():
            tokens, scores = greedy(model, ids, mask, n=12)
            graph_tokens, graph_scores = greedy(model, ids, mask, n=12, cache_implementation="static")
            assert model.model.forward.decode_path == "graph", model.model.forward.decode_path
        assert graph_tokens.tolist() == tokens.tolist(), settings
        torch.testing.assert_close(graph_scores, scores, atol=1e-4, rtol=1e-4)
