"""How a token reads on screen: whitespace drawn, chat markers escaped, long tokens shortened.

The pairing plot labels its tokens and slots with these, and the panels quote tokens with them.
"""

from __future__ import annotations

import html

LABEL_CHARS = 8


def visible_token(text: str) -> str:
    """A token as it reads on screen: line breaks and tabs drawn, leading/trailing spaces as middle dots."""
    shown = text.replace("\n", "↵").replace("\t", "⇥").replace("\r", "")
    stripped = shown.strip(" ")
    lead = len(shown) - len(shown.lstrip(" "))
    tail = len(shown) - len(shown.rstrip(" "))
    return "·" * lead + stripped + "·" * tail if stripped else "·" * len(shown) or "∅"


def escape(text: str) -> str:
    """Plotly reads labels as a small HTML subset; chat markers like <|im_start|> would vanish unescaped."""
    return html.escape(text, quote=False)


def token_label(text: str, width: int = LABEL_CHARS) -> str:
    shown = visible_token(text)
    return escape(shown if len(shown) <= width else shown[: width - 1] + "…")


def token_hover(text: str) -> str:
    return "“" + escape(visible_token(text)) + "”"
