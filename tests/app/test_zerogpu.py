"""ZeroGPU, with a stand-in `spaces` module: the model loads at import and moves to "cuda" at module level; only the
generation runs under `spaces.GPU`; the page cannot switch the model. Run in a fresh interpreter, as a Space starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# What the real package does that matters here: `spaces.GPU` wraps the functions that get a GPU, and a module-level
# move to "cuda" is accepted at once and completed when a GPU is attached (on this CPU machine: recorded, not done).
STAND_IN = '''
"""A stand-in for Hugging Face's `spaces` package on a ZeroGPU Space."""
import functools
import inspect
import pickle

import torch

CALLS = {"gpu": 0, "moved_to_cuda": 0, "inside": False, "warmed_inside": 0, "warmed_outside": 0}
_to = torch.nn.Module.to


def _deferred_to(self, *args, **kwargs):
    device = args[0] if args else kwargs.get("device")
    if device is not None and str(device).startswith("cuda"):
        CALLS["moved_to_cuda"] += 1
        return self
    return _to(self, *args, **kwargs)


torch.nn.Module.to = _deferred_to


def GPU(function=None, duration=60):
    def decorate(fn):
        @functools.wraps(fn)
        def on_gpu(*args, **kwargs):
            CALLS["gpu"] += 1
            CALLS["inside"] = True
            CALLS.setdefault("durations", []).append(duration(*args, **kwargs) if callable(duration) else duration)
            CALLS.setdefault("sizes", []).append([])
            try:
                for item in fn(*args, **kwargs):
                    crossing = pickle.dumps(item)  # what ZeroGPU sends from its worker to the page's process
                    CALLS["sizes"][-1].append(len(crossing))
                    yield pickle.loads(crossing)
            finally:
                CALLS["inside"] = False
        assert inspect.isgeneratorfunction(fn), "slerpviz only puts its generation on the GPU"
        return on_gpu
    return decorate(function) if function is not None else decorate
'''

SCRIPT = textwrap.dedent('''
    import json
    import threading

    import spaces

    started_threads = threading.active_count()
    import app  # a Space runs this file: on ZeroGPU the model loads here, at import
    from slerpviz import engine as engine_module
    from slerpviz.app import callbacks, layout
    from slerpviz.app.resident import RESIDENT
    from slerpviz.models import EMBEDDED

    resident = RESIDENT
    facts = dict(name=resident.name, loaded=resident.engine is not None, load_thread=resident._thread is not None,
                 moved_to_cuda=spaces.CALLS["moved_to_cuda"], gpu_calls_at_import=spaces.CALLS["gpu"])

    warm_up = engine_module.MergingEngine.warm_up
    def recording_warm_up(self):
        spaces.CALLS["warmed_inside" if spaces.CALLS["inside"] else "warmed_outside"] += 1
        return warm_up(self)
    engine_module.MergingEngine.warm_up = recording_warm_up

    demo = layout.build_app()
    model_box = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "model")
    facts["model_menu_interactive"] = model_box.interactive
    page = callbacks.Page()
    outputs = list(page.generate("Say hi.", EMBEDDED, True, 15, [], 0, 0, "slerp", "mean", "cached", 2, 0.0, 0))
    facts["status"] = outputs[-1][9]
    long_prompt = "A long prompt about rivers and the sea. " * 40
    outputs = list(page.generate(long_prompt, EMBEDDED, True, 15, [], 0, 0, "slerp", "mean", "cached", 24, 0.0, 0))
    facts.update(second_status=outputs[-1][9], gpu_calls=spaces.CALLS["gpu"],
                 warmed_inside=spaces.CALLS["warmed_inside"], warmed_outside=spaces.CALLS["warmed_outside"],
                 durations=spaces.CALLS["durations"], sizes=spaces.CALLS["sizes"])
    facts["switch"] = list(page.load_model("Qwen/Qwen2.5-0.5B-Instruct"))[-1][0]
    facts["name_after_switch"] = resident.name
    print("FACTS " + json.dumps(facts))
''')


def test_zero_gpu_loads_at_import_and_puts_only_the_generation_on_the_gpu(tmp_path):
    (tmp_path / "spaces.py").write_text(STAND_IN)
    environment = {**os.environ, "SPACES_ZERO_GPU": "true", "SLERPVIZ_MODEL": "SmolLM2-135M-Instruct (embedded)",
                   "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=environment, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("FACTS "))[6:])
    # Loaded at import, in the main thread, then moved to "cuda" at module level.
    assert facts["loaded"] and facts["name"] == "SmolLM2-135M-Instruct (embedded)" and not facts["load_thread"]
    assert facts["moved_to_cuda"] >= 1 and facts["gpu_calls_at_import"] == 0
    # The generation, and only it, ran under spaces.GPU; the warm-up ran there too, where the GPU is.
    assert facts["status"].startswith("**Done**") and facts["second_status"].startswith("**Done**")
    assert facts["gpu_calls"] == 2
    # Warmed up once in this process, where the GPU is, not once per call.
    assert facts["warmed_inside"] == 1 and facts["warmed_outside"] == 0
    # Each call asked ZeroGPU for the slice its request needs (resident.gpu_seconds, tested on its own).
    assert len(facts["durations"]) == 2 and all(isinstance(d, int) and 20 <= d <= 120 for d in facts["durations"])
    # After the first step pair, each crossing is a step's worth, not the growing traces.
    first, *later = facts["sizes"][1]  # the long prompt's call: the prefill's step pair, then one crossing a step
    assert len(later) >= 8 and max(later) < first / 4 and max(later) - min(later) < 300
    # The model is fixed for the Space's life: the menu is off and a switch changes nothing.
    assert facts["model_menu_interactive"] is False
    assert "fixed on this Space" in facts["switch"] and facts["name_after_switch"] == facts["name"]


def test_the_gpu_slice_asked_for_grows_with_the_prompt_and_the_new_tokens():
    from slerpviz.app.form import parse_request
    from slerpviz.app.resident import GPU_SECONDS, gpu_seconds
    from slerpviz.models import EMBEDDED

    def asked(prompt, new_tokens):
        return gpu_seconds(parse_request(prompt, EMBEDDED, True, 15, [], 0, 0, "slerp", "mean", "cached", new_tokens,
                                         0.0, 0))

    assert asked("Say hi.", 2) == GPU_SECONDS[0]  # a short request asks for the least
    assert asked("Say hi.", 64) < asked("Say hi.", 256) < asked("Say hi.", 512) <= GPU_SECONDS[1]
    assert asked("Say hi.", 256) < asked("word " * 60_000, 256)
    assert all(asked("x" * n, t) % 10 == 0 for n in (10, 5_000) for t in (8, 300))
