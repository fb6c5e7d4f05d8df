"""lm-evaluation-harness on a patched model: a local pass-key task, base and merged, nothing downloaded.

    pip install lm_eval        # not one of slerpviz's requirements
    python -m examples.lm_eval_passkey [--samples 10] [--length 1024] [--preset recommended] [--batch-size 4]

The task is written to a temporary folder (a JSON-lines file and its YAML) from the filler in assets/texts, so the
harness loads it with `datasets`' local json builder. HFLM wraps the embedded model; `slerpviz.merging` patches that
same model object, so the harness's own generate calls merge inside the `with` block.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

import slerpviz
from slerpviz.bench.texts import read_texts
from slerpviz.models import EMBEDDED, load
from slerpviz.presets import preset
from slerpviz.tasks import Haystack, build_prompt

TASK = """\
task: slerpviz_passkey
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: first-5-digits
    filter:
      - function: regex
        regex_pattern: "(\\\\d{{5}})"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_task(folder: Path, tokenizer, samples: int, length: int) -> None:
    haystack = Haystack(tokenizer, [text for _, text in read_texts()])
    with open(folder / "passkey.jsonl", "w") as out:
        for sample in range(samples):
            prompt = build_prompt(haystack, "passkey", length, (sample % 5) / 4, sample)
            text = tokenizer.decode(prompt.ids[0], skip_special_tokens=True)
            out.write(json.dumps({"prompt": text, "answer": prompt.answer}) + "\n")
    (folder / "slerpviz_passkey.yaml").write_text(TASK.format(data=folder / "passkey.jsonl"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--preset", default="recommended")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts a generate call runs together")
    args = parser.parse_args()

    engine = load(EMBEDDED)
    model, tokenizer = engine.model, engine.tokenizer
    settings = preset(args.preset, engine.num_layers)
    with tempfile.TemporaryDirectory() as folder:
        write_task(Path(folder), tokenizer, args.samples, args.length)
        tasks = TaskManager(include_path=folder)
        # The harness pads a batch on the left; the patch merges each prompt on its own and decodes them together.
        harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
        scores = {}
        for label, context in (("base", None), (args.preset, slerpviz.merging(model, settings))):
            if context is None:
                result = lm_eval.simple_evaluate(model=harness, tasks=["slerpviz_passkey"], task_manager=tasks)
            else:
                with context:
                    result = lm_eval.simple_evaluate(model=harness, tasks=["slerpviz_passkey"], task_manager=tasks)
            scores[label] = result["results"]["slerpviz_passkey"]["exact_match,first-5-digits"]
    for label, score in scores.items():
        print(f"{label:>12}: pass key found {score:.2f} (n = {args.samples}, {args.length} tokens)")


if __name__ == "__main__":
    main()
