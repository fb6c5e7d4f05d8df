"""The texts fidelity is measured on: the default set in assets/texts/, or the user's own."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_TEXTS = Path(__file__).resolve().parents[2] / "assets" / "texts"

# A line holding only three or more dashes separates texts inside one file.
_SEPARATOR = re.compile(r"^\s*-{3,}\s*$", re.MULTILINE)


@dataclass(frozen=True)
class TokenText:
    """A text as the model reads it: a name and its token ids."""

    name: str
    ids: torch.Tensor  # [1, n]


def read_texts(paths: list[Path] | None = None) -> list[tuple[str, str]]:
    """(name, text) pairs. A folder means its *.txt files; a file holds one text, or several separated by '---'."""
    paths = paths or [DEFAULT_TEXTS]
    texts = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no such text file or folder: {path}")
        files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
        for file in files:
            parts = [p.strip() for p in _SEPARATOR.split(read_file(file)) if p.strip()]
            texts += [(file.stem if len(parts) == 1 else f"{file.stem}#{i + 1}", part) for i, part in enumerate(parts)]
    if not texts:
        raise ValueError(f"no texts found in {', '.join(map(str, paths))}")
    return texts


def read_file(file: Path) -> str:
    """One text file as UTF-8; a file that is not (or cannot be read) is a ValueError naming it, so that one bad file
    among a folder's is found without a hunt."""
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{file} is not UTF-8 text: byte 0x{error.object[error.start]:02x} at offset {error.start} "
                         f"({error.reason}); save it as UTF-8 or leave it out of --texts") from None
    except OSError as error:
        raise ValueError(f"cannot read {file}: {error.strerror or error}") from None


def tokenize(tokenizer, texts: list[tuple[str, str]]) -> list[TokenText]:
    """Raw text, no chat template: fidelity is about continuing prose."""
    return [TokenText(name, tokenizer(text, return_tensors="pt")["input_ids"]) for name, text in texts]


def random_texts(vocab_size: int, count: int, length: int, seed: int = 0) -> list[TokenText]:
    """Stand-ins for models with random weights and no tokenizer: only good for exercising the code path."""
    generator = torch.Generator().manual_seed(seed)
    return [TokenText(f"random-{i + 1}", torch.randint(0, vocab_size, (1, length), generator=generator))
            for i in range(count)]


def windows(texts: list[TokenText], offsets: tuple[int, ...]) -> list[TokenText]:
    """Each text read from each offset on (`name@offset`): more prefixes from the same prose. Offset 0 is the text
    itself; an offset that leaves fewer than 16 tokens is skipped."""
    out = []
    for text in texts:
        for offset in offsets:
            if offset == 0:
                out.append(text)
            elif text.ids.shape[-1] - offset >= 16:
                out.append(TokenText(f"{text.name}@{offset}", text.ids[:, offset:]))
    return out
