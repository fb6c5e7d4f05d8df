"""Retrieval prompts and their scoring: a needle hidden in filler prose, and whether a continuation found it.

What the retrieval benchmark (slerpviz.bench.retrieval) runs and what the page shows of a pass-key prompt (where the
needle sits, whether each side found the key) are the same prompts, built and scored here.

A prompt is filler prose (any text: the default fidelity texts, nothing to download) with a needle hidden at a chosen
depth and a question at the end that the needle answers. A continuation is correct when the exact answer appears in
it.

Tasks:
- `passkey`: "The pass key is 48213. Remember it. 48213 is the pass key." at the depth; asked at the end.
- `multikey`: several "The special magic number for <word> is <7 digits>." lines through the filler; the one at the
  asked depth is queried, the others are distractors.

Prompts are built from token ids, piece by piece, so their length is exact; the needle is inserted at the sentence
boundary of the filler nearest the asked depth. Raw text, no chat template: the question ends in the words that
start the answer ("The pass key is"), which a small instruct model completes reliably.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

TASKS = ("passkey", "multikey")
# Words naming the multikey needles: common, single-token-ish, unrelated to the filler's topics.
KEY_WORDS = ("apple", "river", "candle", "violet", "harbor", "pencil", "falcon", "marble", "lantern", "meadow",
             "copper", "saddle", "orchid", "thunder", "basket", "silver")
# multikey: needles besides the one asked for. With 3 the 135M base model picked a distractor a third of the
# time at 256 tokens; the test is whether merging loses the answer, so the base must mostly find it.
DISTRACTORS = 2

INSTRUCTIONS = {
    "passkey": "There is an important pass key hidden inside a lot of irrelevant text. Find it and remember it. "
               "I will ask you about the pass key.\n\n",
    "multikey": "Some special magic numbers are hidden inside a lot of irrelevant text. Find them and remember them. "
                "I will ask you about one of them.\n\n",
}


@dataclass(frozen=True)
class Prompt:
    """One retrieval prompt: token ids [1, length], the answer, and where the asked needle sits."""

    task: str
    length: int
    depth: float
    sample: int
    ids: torch.Tensor
    answer: str
    needle_start: int  # token index of the asked needle's first token
    needle_end: int  # one past its last token

    @property
    def needle_depth(self) -> float:
        """Where the needle actually sits, as a share of the prompt."""
        return self.needle_start / self.length


def passkey_pieces(rng: random.Random) -> tuple[str, str, str]:
    key = str(rng.randint(10000, 99999))
    needle = f"\n\nThe pass key is {key}. Remember it. {key} is the pass key."
    return needle, "\n\nWhat is the pass key? The pass key is", key


def multikey_pieces(rng: random.Random) -> tuple[str, list[str], str, str]:
    """The asked needle, the distractor needles, the question and the answer."""
    words = rng.sample(KEY_WORDS, DISTRACTORS + 1)
    numbers = [str(rng.randint(1000000, 9999999)) for _ in words]
    lines = [f"\n\nThe special magic number for {w} is {n}." for w, n in zip(words, numbers)]
    question = f"\n\nWhat is the special magic number for {words[0]}? The special magic number for {words[0]} is"
    return lines[0], lines[1:], question, numbers[0]


def sentence_ends(tokens: list[str]) -> list[int]:
    """Indices i where a needle may go before filler token i: after a token ending a sentence."""
    return [i + 1 for i, text in enumerate(tokens) if text.rstrip().endswith((".", "!", "?"))]


def nearest(candidates: list[int], target: int, default: int) -> int:
    return min(candidates, key=lambda c: (abs(c - target), c)) if candidates else default


class Haystack:
    """Filler token ids as a ring over the concatenated texts, so samples start at different places."""

    def __init__(self, tokenizer, texts: list[str]):
        self.tokenizer = tokenizer
        joined = "\n\n".join(t.strip() for t in texts)
        self.ids = tokenizer(joined, add_special_tokens=False)["input_ids"]
        self.strings = tokenizer.batch_decode([[i] for i in self.ids])

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, start: int, count: int) -> tuple[list[int], list[str]]:
        """`count` filler tokens ending near `start`, wrapping around; they end at a sentence end when they can,
        so the question does not read as the end of a broken sentence."""
        if count > len(self.ids):
            raise ValueError(f"the filler text has {len(self.ids)} tokens; a prompt needs {count} of them: "
                             f"give longer --texts or shorter --lengths")
        end = nearest([e % len(self.ids) for e in sentence_ends(self.strings)], start % len(self.ids), 0)
        index = [(end - count + k) % len(self.ids) for k in range(count)]
        return [self.ids[i] for i in index], [self.strings[i] for i in index]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def build_prompt(haystack: Haystack, task: str, length: int, depth: float, sample: int, seed: int = 0) -> Prompt:
    """A prompt of exactly `length` tokens with the asked needle at `depth` (0 = just after the instructions, 1 =
    just before the question) of the filler, at the nearest sentence boundary."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if not 0 <= depth <= 1:
        raise ValueError(f"depth {depth!r} must be between 0 and 1")
    rng = random.Random(f"{seed}/{task}/{length}/{depth}/{sample}")
    if task == "passkey":
        needle, question, answer = passkey_pieces(rng)
        distractors: list[str] = []
    else:
        needle, distractors, question, answer = multikey_pieces(rng)
    head = [*_bos(haystack.tokenizer), *haystack.encode(INSTRUCTIONS[task])]
    needle_ids = haystack.encode(needle)
    distractor_ids = [haystack.encode(d) for d in distractors]
    tail = haystack.encode(question)
    filler_count = length - len(head) - len(needle_ids) - sum(map(len, distractor_ids)) - len(tail)
    if filler_count < 1:
        raise ValueError(f"length {length} is too short for the {task} task's instructions, needle and question")
    filler, strings = haystack.take(rng.randrange(len(haystack)), filler_count)
    ends = [e for e in sentence_ends(strings) if e < filler_count] + [0, filler_count]
    at = nearest(ends, round(depth * filler_count), round(depth * filler_count))
    # Distractors go at random sentence boundaries away from the asked needle, inserted from the back so earlier
    # offsets stay valid.
    inserts = [(at, needle_ids, True)]
    others = [e for e in ends if abs(e - at) > 8] or ends
    inserts += [(rng.choice(others), ids, False) for ids in distractor_ids]
    inserts.sort(key=lambda item: (item[0], not item[2]), reverse=True)
    body = list(filler)
    for position, ids, _ in inserts:
        body[position:position] = ids
    start = len(head) + at + sum(len(ids) for position, ids, asked in inserts if not asked and position < at)
    # A distractor at the very same boundary goes after the asked needle (sorted so), which leaves `start` right.
    ids = torch.tensor([head + body + tail])
    assert ids.shape[-1] == length, (ids.shape, length)
    return Prompt(task, length, depth, sample, ids, answer, start, start + len(needle_ids))


def _bos(tokenizer) -> list[int]:
    """The tokenizer's own start token when it adds one (Llama, Mistral); none for SmolLM2 and Qwen2."""
    probe = tokenizer("a")["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None and probe[:1] == [bos] else []


# A pass-key needle as passkey_pieces writes it, or any "pass key is <digits>" a user wrote.
_NEEDLE = re.compile(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\.|pass key is (\d+)")


@dataclass(frozen=True)
class Needle:
    """A pass key found in a prompt: the answer and the tokens [start, end) that state it."""

    answer: str
    start: int
    end: int


def find_passkey(tokens: list[str]) -> Needle | None:
    """The first pass-key statement in a prompt given as token strings, or None.

    Skips a statement that is the prompt's own question ("The pass key is" at the very end has no digits)."""
    text = "".join(tokens)
    match = _NEEDLE.search(text)
    if match is None:
        return None
    bounds, offset = [], 0
    for token in tokens:
        bounds.append(offset)
        offset += len(token)
    start = max(i for i, b in enumerate(bounds) if b <= match.start())
    end = max(i for i, b in enumerate(bounds) if b < match.end()) + 1
    return Needle(match.group(1) or match.group(2), start, end)


def is_correct(answer: str, output: str) -> bool:
    """The exact answer appears in the continuation, not as part of a longer number."""
    digits = "".join(c if c.isdigit() else " " for c in output).split()
    return answer in digits
