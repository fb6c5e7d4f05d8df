"""The real packaged model (SmolLM2-135M-Instruct), loaded offline, and the command line."""

import json
import re
import subprocess
import sys

import torch

from slerpviz.engine import MergeSettings, Sampling
from slerpviz.models import cache_dir

PROMPT = "Explain in three sentences why the sky is blue during the day."
COMMON_WORDS = {"the", "is", "of", "and", "a", "to", "in", "that", "it", "light", "sky", "blue", "sun", "this"}


def test_embedded_model_is_cached_as_safetensors(embedded):
    assert (cache_dir() / "model.safetensors").exists()
    assert embedded.config.model_type == "llama" and embedded.num_layers == 30


def test_embedded_without_merging_is_the_model(embedded):
    ids = embedded.encode(PROMPT)
    run = embedded.start(ids, MergeSettings(cutoffs=(30,)), Sampling(max_new_tokens=24))
    tokens = [step.token_id for step in run]
    reference = embedded.model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    assert tokens == reference
    logits = embedded.prefill(ids, MergeSettings()).logits
    with torch.no_grad():
        torch.testing.assert_close(logits, embedded.model(ids).logits[:, -1].float(), atol=1e-4, rtol=1e-4)


def test_merged_generation_at_a_middle_cutoff_is_still_english(embedded):
    trace = embedded.generate(PROMPT, MergeSettings(cutoffs=(15,)), Sampling(max_new_tokens=40))
    words = re.findall(r"[A-Za-z']+", trace.text)
    assert len(words) >= 15, trace.text
    assert sum(c.isascii() for c in trace.text) / len(trace.text) > 0.95, trace.text
    assert len({w.lower() for w in words} & COMMON_WORDS) >= 3, trace.text
    assert trace.seq_len_per_layer[15] < trace.seq_len_per_layer[14]
    assert sum(trace.kv_bytes_per_layer[15:]) < sum(trace.kv_bytes_per_layer[:15])


def test_chat_template_wraps_the_prompt(embedded):
    chat = embedded.encode("Hello there")
    raw = embedded.encode("Hello there", chat=False)
    assert chat.shape[1] > raw.shape[1]
    assert "Hello there" in embedded.tokenizer.decode(chat[0])
    assert embedded.tokenizer.decode(chat[0]).rstrip().endswith("assistant")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "slerpviz", "generate", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_prints_one_json_object_with_both_runs():
    result = run_cli("--prompt", PROMPT, "--cutoff", "10", "--cutoff", "20", "--keep-start", "4", "--keep-end", "3",
                     "--max-new-tokens", "6", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"base", "merged", "plan", "seq_len_per_layer"} <= data.keys()
    assert data["plan"]["cutoffs"] == [10, 20]
    merged = data["seq_len_per_layer"]["merged"]
    assert merged[0] == data["seq_len_per_layer"]["base"][0] > merged[10] > merged[20]
    assert 1 <= data["merged"]["tokens_generated"] <= 6 and data["base"]["text"]


def test_cli_refuses_bad_input_without_a_traceback():
    for args, message in [
        (("--prompt", "hi", "--cutoff", "31"), "cutoff 31 is out of range: choose a layer from 0 to 30"),
        (("--prompt", "hi", "--model", "gpt2"), "not on the allow-list"),
        (("--prompt", " "), "the prompt is empty"),
        (("--prompt", "hi", "--keep-start", "500"), "longer than the prompt"),
        (("--prompt", "hi", "--method", "avg"), "unknown merge method"),
    ]:
        result = run_cli(*args)
        assert result.returncode == 2
        assert message in result.stderr
        assert "Traceback" not in result.stderr
