"""What users write keeps working whatever moves inside: the public names, the two commands and app.py."""

import ast
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
    for path in (ROOT / "slerpviz").glob("*.py"):
        if path.name not in ("cli.py", "__main__.py"):
            assert not [m for m in imports_of(path) if m.startswith(("app", "bench", "cli"))], path.name


def imports_of(path: Path) -> list[str]:
    """The slerpviz modules a file imports, as dotted names relative to the package (e.g. 'app.form')."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]  # ('slerpviz', 'app') for slerpviz/app/x.py
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package[: len(package) - node.level + 1])
            module = ".".join([*base, node.module] if node.module else base)
            found += [module] if node.module else [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("slerpviz"):
            found.append(node.module)
    return [name.removeprefix("slerpviz.") for name in found]


def test_the_page_never_imports_the_benchmarks_and_the_benchmarks_never_the_page_or_the_command_line():
    for path in (ROOT / "slerpviz" / "app").glob("*.py"):
        assert not [m for m in imports_of(path) if m.startswith(("bench", "cli"))], path.name
    for path in (ROOT / "slerpviz" / "bench").glob("*.py"):
        assert not [m for m in imports_of(path) if m.startswith(("app", "cli"))], path.name


def test_the_modules_import_one_another_without_a_circle():
    graph = {}
    for path in (ROOT / "slerpviz").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT / "slerpviz").with_suffix("").parts).removesuffix(".__init__")
        graph[name] = {m for m in imports_of(path) if m != name}
    modules = set(graph)

    def resolve(name):  # "app" for the package, "app.form" for a module, an imported name to its module
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    edges = {n: {resolve(m) for m in deps} - {n, "", "__init__"} for n, deps in graph.items()}
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in edges.get(node, ()):
            if state.get(nxt) == "open":
                raise AssertionError(f"circle: {' -> '.join([*path, nxt])}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in edges:
        if node not in state:
            visit(node, [node])


def test_no_module_is_over_about_450_lines_and_no_function_over_about_100():
    for path in (ROOT / "slerpviz").rglob("*.py"):
        text = path.read_text()
        assert len(text.splitlines()) <= 460, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 100, (path.name, node.name)
