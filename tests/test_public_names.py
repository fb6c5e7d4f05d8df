"""What users write keeps working whatever moves inside: the public names, the two commands and app.py."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_public_names_import():
    import slerpviz
    from slerpviz import MergeSettings, Sampling, apply, merging, remove
    from slerpviz.presets import preset, recommended

    assert callable(slerpviz.merging) and merging is slerpviz.merging and callable(apply) and callable(remove)
    assert recommended(30) == preset("recommended", 30) and isinstance(recommended(30), MergeSettings)
    assert Sampling().max_new_tokens > 0


def test_the_commands_and_the_app_answer_their_help():
    for argv in (["-m", "slerpviz", "--help"], ["-m", "slerpviz.bench", "--help"], ["app.py", "--help"]):
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "usage" in done.stdout.lower(), (argv, done.stderr[-500:])


def test_the_library_never_imports_the_app_the_benchmarks_or_the_command_line():
    import ast

    for path in (ROOT / "slerpviz").glob("*.py"):
        if path.name in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                names = [alias.name for alias in node.names]
                assert not module.lstrip(".").startswith(("app", "bench", "cli")), (path.name, module)
                assert not (module == "." and set(names) & {"app", "bench", "cli"}), (path.name, names)
