"""The page's clickable examples, as data: a prompt and the settings to try it with.

An example is shown by its label only; a click fills the form's fields (`Example.values`), reading a preset for the
model loaded then.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import presets
from ..engine import MergeSettings
from .form import merge_values

ASSETS = Path(__file__).resolve().parents[2] / "assets"


@dataclass(frozen=True)
class Example:
    """A clickable example. `settings` is the merged side's MergeSettings, or a preset's name: a preset is read at
    click time for the loaded model's depth, so it always says what slerpviz.presets says now."""

    label: str
    prompt: str
    settings: MergeSettings | str
    max_new_tokens: int = 48
    mode: str = "cached"
    chat: bool = True

    def merge_settings(self, num_layers: int) -> MergeSettings:
        if isinstance(self.settings, str):
            return presets.preset(self.settings, num_layers)
        return self.settings

    def values(self, num_layers: int) -> dict:
        """Every field an example fills in (form.EXAMPLE_FIELDS + form.MERGE_FIELDS), by name."""
        return dict(prompt=self.prompt, chat=self.chat, mode=self.mode, max_new_tokens=self.max_new_tokens,
                    **merge_values(self.merge_settings(num_layers), num_layers))


def examples() -> list[Example]:
    def at(cutoff: int, **changes) -> MergeSettings:
        return MergeSettings(cutoffs=(cutoff,), **changes)

    sky = "Explain in three short sentences why the sky is blue."
    chosen = [
        Example("Why is the sky blue? (cutoff 15)", sky, at(15)),
        Example("Haiku (cutoff 10)", "Write a haiku about a lighthouse in winter.", at(10), 32),
        Example("Paperclips, lerp (cutoff 20)", "List five uses of a paperclip, one per line.", at(20, method="lerp")),
        Example("Article's seed-2024 code, recompute", "What is the capital of France? Answer in one word.",
                at(8, method="seed-2024", positions="renumber"), 12, mode="recompute"),
        Example("Why is the sky blue? Recommended preset", sky, "recommended"),
    ]
    document = ASSETS / "examples" / "long_document.txt"
    if document.exists():
        text = document.read_text(encoding="utf-8").strip()
        chosen.append(Example("Long report (~1,500 tokens): the speed difference shows",
                              f"Summarise the following report in three sentences.\n\n{text}", at(4, keep_end=8), 16))
    passkey = ASSETS / "examples" / "passkey.txt"
    if passkey.exists():
        # Raw text ending in "The pass key is": the model completes it best without the chat template.
        text = passkey.read_text(encoding="utf-8").strip()
        chosen.append(Example("Find the pass key (~1,500 tokens), recommended preset", text, "recommended", 10,
                              chat=False))
        chosen.append(Example("Same pass key, fast preset (about 1.5x fewer prefill FLOPs)", text, "fast", 10,
                              chat=False))
    return chosen
