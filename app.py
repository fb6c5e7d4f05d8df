"""Entry point: `python app.py` opens the page; on a Hugging Face Space this same file is the app file.

It only builds the Blocks from the library and launches them. Flags win over the environment:
  --host  / $SLERPVIZ_HOST, else $GRADIO_SERVER_NAME, else 127.0.0.1
  --port  / $SLERPVIZ_PORT, else $GRADIO_SERVER_PORT, else 7860
  --share / $SLERPVIZ_SHARE=1 for a public gradio.live link
  --model / $SLERPVIZ_MODEL, else Mistral-7B-Instruct where a GPU has room, else the embedded SmolLM2

On a ZeroGPU Space ($SPACES_ZERO_GPU set) the model loads here, at import, and moves to "cuda" at module level, as
ZeroGPU documents: `spaces` attaches a GPU only inside the functions under its decorator (the generation), and
completes the move then. Everywhere else the page loads the model in the background once it is built.
"""

from __future__ import annotations

import os

if os.environ.get("SPACES_ZERO_GPU"):
    import spaces  # noqa: F401  - first, before torch initialises CUDA: it patches torch for ZeroGPU

import argparse

from slerpviz.app.layout import build_app, serve
from slerpviz.app.resident import RESIDENT, default_model, on_zero_gpu
from slerpviz.models import ALLOWED_MODELS, load_for_zero_gpu

if on_zero_gpu():
    RESIDENT.install(default_model(), load_for_zero_gpu(default_model()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="slerpviz: base and merged generations side by side")
    parser.add_argument("--host", default=os.environ.get("SLERPVIZ_HOST"),
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for the network)")
    port = os.environ.get("SLERPVIZ_PORT")
    parser.add_argument("--port", type=int, default=int(port) if port else None, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", default=os.environ.get("SLERPVIZ_SHARE") == "1",
                        help="also open a public gradio.live link")
    parser.add_argument("--model", choices=ALLOWED_MODELS, default=None, metavar="NAME",
                        help="model loaded when the app starts, one of: " + "; ".join(ALLOWED_MODELS)
                        + " (default: $SLERPVIZ_MODEL, else Mistral-7B-Instruct where a GPU has room, else the "
                        "embedded SmolLM2; on ZeroGPU only $SLERPVIZ_MODEL, read at import)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    demo = build_app(model=args.model or default_model())
    serve(demo, host=args.host, port=args.port, share=args.share)


if __name__ == "__main__":
    main()
