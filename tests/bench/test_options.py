"""`python -m slerpviz.bench`'s subcommands share their common options (declared once, in slerpviz.bench.options),
keep each option's default, list their options under --help, refuse bad input in one line with status 2, and their
modules import in any order (no import cycle)."""

from __future__ import annotations

import argparse
import ast
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from slerpviz.bench import command, fidelity, frontier, locate, options, patched, retrieval, speed

BENCH = Path(options.__file__).parent
SUBCOMMANDS = ("speed", "fidelity", "frontier", "retrieval", "locate")
MODEL_AND_RUN = {"model": None, "shape": None, "device": None, "dtype": None, "seed": 0, "quick": False,
                 "out": Path("bench-out"), "threads": None}
MERGE = {"cutoffs": None, "ratio": 1.0, "choice": "consecutive", "keep_start": 0, "keep_end": 0}
ATTENTION = {"attention_window": 8, "attention_keep": 32, "attention_keep_share": 0.0, "attention_reach": 0,
             "cosine_share": 0.0}  # MergeSettings' own
SHARED = {  # what each subcommand takes from the shared parents, with the defaults the README documents
    "speed": {**MODEL_AND_RUN, **MERGE, **ATTENTION, "proportional": "off"},
    "fidelity": {**MODEL_AND_RUN, **MERGE, "proportional": "off", "texts": None},
    "frontier": {**MODEL_AND_RUN, "texts": None},
    "retrieval": {**MODEL_AND_RUN, **MERGE, **ATTENTION, "texts": None},
    "locate": {**MODEL_AND_RUN, "attention_window": 8, "texts": None},  # the window, as the attention choice's
}
OWN = {  # a few options of each subcommand's own, with their defaults
    "speed": {"preset": None, "lengths": None, "modes": "cached,recompute", "method": "slerp", "positions": "mean"},
    "fidelity": {"prefixes": None, "methods": "slerp,lerp,slerp-dir,seed-2024", "threshold": 0.9},
    "frontier": {"grid": "default", "method": "slerp", "positions": "mean", "speed_length": None, "offsets": None},
    "retrieval": {"preset": [], "tasks": None, "lengths": None, "depths": None, "samples": None},
    "locate": {"tasks": None, "lengths": None, "depths": None, "samples": None},
}


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in command.parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_takes_the_shared_options_with_their_defaults(name):
    args = vars(command.parser().parse_args([name]))
    assert args["benchmark"] == name and callable(args["run"])
    assert {key: args[key] for key in SHARED[name]} == SHARED[name]
    assert {key: args[key] for key in OWN[name]} == OWN[name]
    given = command.parser().parse_args([name, "--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--seed",
                                         "3", "--quick", "--out", "elsewhere", "--threads", "1"])
    assert (given.shape, given.device, given.dtype, given.seed, given.quick, given.out, given.threads) == (
        "tiny", "cpu", "float32", 3, True, Path("elsewhere"), 1)


def test_the_shared_options_are_the_same_actions_everywhere():
    """One declaration: the same help and type wherever an option is shared (the texts that differ on purpose, like
    --shape's "fidelity means nothing", are the only exceptions)."""
    differ = {"--shape", "--seed", "--quick", "--out", "--threads", "--texts", "--cutoffs", "--choice"}
    shared = (option_strings(options.model_options("x")) | option_strings(options.merge_options("x"))) - differ
    seen: dict[str, tuple] = {}
    for name, parser in subparsers().items():
        for action in parser._actions:
            for flag in set(action.option_strings) & shared:
                key = (action.help, action.type, action.default, action.choices and tuple(action.choices))
                assert seen.setdefault(flag, key) == key, f"{flag} of {name} differs"
    assert {"--model", "--device", "--dtype", "--ratio", "--keep-start", "--attention-window"} <= set(seen)


@pytest.mark.parametrize("name, module", [("speed", speed), ("fidelity", fidelity), ("frontier", frontier),
                                          ("retrieval", retrieval), ("locate", locate)])
def test_each_benchmark_parses_the_same_on_its_own(name, module):
    """Each benchmark's main takes its own argv too: its module's parser is the subcommand's."""
    standalone = module.parser
    sub = subparsers()[name]
    own = standalone()
    assert own.prog == sub.prog == f"python -m slerpviz.bench {name}"
    assert option_strings(own) == option_strings(sub)
    assert {k: v for k, v in vars(sub.parse_args([])).items() if k != "run"} == vars(own.parse_args([]))


@pytest.mark.parametrize("name", [*SUBCOMMANDS, "snapshot"])
def test_help_lists_each_subcommands_options(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        command.main([name, "--help"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"usage: python -m slerpviz.bench {name}")
    for flag in option_strings(subparsers()[name]):
        assert flag in printed
    if name != "snapshot":
        for flag in ("--model", "--shape", "--device", "--quick", "--out", "--threads"):
            assert flag in printed


@pytest.mark.parametrize("argv, message", [
    (["speed", "--ratio", "half"], "argument --ratio: merge ratio must be a number from 0 to 1 (got 'half')"),
    (["fidelity", "--lengths", "128"], "unrecognized arguments: --lengths 128"),  # speed's, not fidelity's
    (["speed", "--texts", "x.txt"], "unrecognized arguments: --texts x.txt"),  # fidelity's, not speed's
    (["retrieval", "--shape", "huge"], "argument --shape: invalid choice: 'huge'"),
    (["frontier", "--shape", "tiny", "--model", "x"], "argument --model: not allowed with argument --shape"),
    (["benchmark"], "argument benchmark: invalid choice: 'benchmark'"),
    ([], "the following arguments are required: benchmark"),
    (["snapshot", "only-one.html"], "the following arguments are required: picture"),
    # Counts and shares by the app's and the CLI's rules, before any model work: once a traceback, or silently the
    # default (0 read as "not given"), or a full run with a seed the app refuses.
    (["retrieval", "--samples", "-1"], "argument --samples: must be a whole number, 1 or more (got '-1')"),
    (["retrieval", "--samples", "0"], "argument --samples: must be a whole number, 1 or more (got '0')"),
    (["speed", "--threads", "-3"], "argument --threads: must be a whole number, 1 or more (got '-3')"),
    (["frontier", "--threads", "0"], "argument --threads: must be a whole number, 1 or more (got '0')"),
    (["retrieval", "--seed", "-1"], "argument --seed: must be a whole number from 0 to"),
    (["speed", "--repeats", "0"], "argument --repeats: must be a whole number, 1 or more (got '0')"),
    (["speed", "--ratio", "nan"], "argument --ratio: merge ratio must be a number from 0 to 1 (got 'nan')"),
    (["retrieval", "--ratio", "0.5,2"], "argument --ratio: ratio per cutoff must be a number from 0 to 1 (got '2')"),
    (["retrieval", "--ratio", "0.5/1"],
     "argument --ratio: ratio per cutoff: separate the ratios with commas, like 0.5,1 (got '0.5/1')"),
    (["retrieval", "--cosine-share", "2"], "argument --cosine-share: must be a number from 0 to 1 (got '2')"),
    (["retrieval", "--keep-end", "2.5"], "argument --keep-end: must be a whole number, 0 or more (got '2.5')"),
])
def test_a_value_argparse_refuses_is_one_line_and_status_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        command.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_bad_list_is_one_line_and_status_2(tmp_path, capsys):
    """Once a SystemExit with status 1; now an error line like every other bad setting."""
    assert command.main(["speed", "--shape", "tiny", "--choice", "random", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown pair choice 'random'; choose from consecutive, uniform, similar, attention\n"


def test_the_list_helpers():
    assert options.int_list("512, 1024,") == (512, 1024)
    assert options.float_list("0,0.5, 1") == (0.0, 0.5, 1.0)
    assert options.str_list("slerp,lerp", ("slerp", "lerp"), "method") == ("slerp", "lerp")
    with pytest.raises(ValueError, match="bad list of whole numbers"):
        options.int_list("1,x")
    with pytest.raises(ValueError, match=r"length must be a whole number, 1 or more \(got -5\)"):
        options.int_list("256,-5")
    assert options.int_list("0,200", "offset", 0) == (0, 200)
    with pytest.raises(ValueError, match="give --choice a single value"):
        options.one_of(("a", "b"), "--choice")


# ----------------------------------------------------------------------------------------------------------------
# No import cycle
# ----------------------------------------------------------------------------------------------------------------


def bench_imports() -> dict[str, set[str]]:
    """Which slerpviz.bench modules each module of the package imports, at the top or inside a function."""
    graph = {}
    for path in BENCH.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slerpviz.bench."):
                found.add(node.module.removeprefix("slerpviz.bench."))
        graph[path.stem] = {name.split(".")[0] for name in found} - {path.stem}
    return graph


def test_the_bench_modules_import_each_other_without_a_cycle():
    graph = bench_imports()
    assert "command" not in set().union(*(graph[m] for m in graph if m not in ("__init__", "__main__")))
    assert not graph["options"] & {"command", "speed", "fidelity", "frontier", "retrieval", "locate"}
    state: dict[str, str] = {}

    def visit(module, path):
        if state.get(module) == "open":
            raise AssertionError("import cycle: " + " -> ".join([*path, module]))
        if state.get(module) != "done":
            state[module] = "open"
            for imported in sorted(graph.get(module, ())):
                visit(imported, [*path, module])
            state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_the_subcommand_modules_import_in_any_order():
    modules = ("command", "frontier", "retrieval", "options")
    script = "\n".join([
        "import importlib, itertools, sys",
        f"for order in itertools.permutations({modules!r}):",
        "    for name in [m for m in sys.modules if m == 'slerpviz' or m.startswith('slerpviz.')]:",
        "        del sys.modules[name]",
        "    for name in order:",
        "        importlib.import_module('slerpviz.bench.' + name)",
        "    assert callable(sys.modules['slerpviz.bench.command'].main), order",
        "print('ok', len(list(itertools.permutations(" + repr(modules) + "))))",
    ])
    done = subprocess.run([sys.executable, "-c", script], cwd=BENCH.parent.parent, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"ok {len(list(itertools.permutations(modules)))}"


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_a_model_out_of_reach_is_one_line_and_status_2(subcommand, monkeypatch, capsys, tmp_path):
    from slerpviz import models

    def unreachable(name, **options):
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {name}. Check your "
                      "internet connection or see\nhttps://huggingface.co/docs/transformers/installation")

    monkeypatch.setattr(models, "load", unreachable)
    model = "Qwen/Qwen2.5-0.5B-Instruct"
    assert command.main([subcommand, "--model", model, "--quick", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: could not load {model}: We couldn't connect to 'https://huggingface.co' to load the files of {model}.")


# ----------------------------------------------------------------------------------------------------------------
# Texts: a file that cannot be read is named
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def texts_with_a_bad_file(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "good.txt").write_text("A sentence of filler prose that is plain UTF-8. " * 40, encoding="utf-8")
    (folder / "latin1.txt").write_bytes("Caf\u00e9 au lait, na\u00efve. ".encode("latin-1") * 40)  # 0xe9: not UTF-8
    return folder


def test_a_text_file_that_is_not_utf8_is_named(texts_with_a_bad_file):
    from slerpviz.bench.texts import read_texts

    with pytest.raises(ValueError) as error:
        read_texts([texts_with_a_bad_file])
    message = str(error.value)
    assert str(texts_with_a_bad_file / "latin1.txt") in message and "not UTF-8" in message and "0xe9" in message
    assert "good.txt" not in message


def test_a_folder_where_a_text_file_should_be_is_named(tmp_path):
    from slerpviz.bench.texts import read_texts

    (tmp_path / "chapter.txt").mkdir()  # matches *.txt, but cannot be read as a text
    with pytest.raises(ValueError, match=f"cannot read {tmp_path / 'chapter.txt'}"):
        read_texts([tmp_path])


@pytest.mark.parametrize("subcommand", ["retrieval", "locate", "frontier"])
def test_a_bad_text_file_is_one_line_naming_it_and_status_2(subcommand, texts_with_a_bad_file, tmp_path, capsys):
    argv = [subcommand, "--shape", "tiny", "--quick", "--texts", str(texts_with_a_bad_file),
            "--out", str(tmp_path / "out")]
    assert command.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert str(texts_with_a_bad_file / "latin1.txt") in err


# ----------------------------------------------------------------------------------------------------------------
# Empty values are refused, never read as "not given"
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_run(monkeypatch):
    """Any engine built fails the test: these inputs must be refused before a benchmark starts (once an empty
    --lengths ran the default, full benchmark)."""
    def refused(*args, **kwargs):
        pytest.fail("a benchmark started on an input it should have refused")

    for module in (options, speed, fidelity, retrieval, locate, patched):
        monkeypatch.setattr(module, "build_engine", refused)


LIST_OPTIONS = [
    ("speed", "--lengths"), ("speed", "--modes"), ("speed", "--cutoffs"), ("speed", "--choice"), ("speed", "--preset"),
    ("speed", "--decode"), ("speed", "--prefill"),
    ("fidelity", "--prefixes"), ("fidelity", "--methods"), ("fidelity", "--positions"), ("fidelity", "--cutoffs"),
    ("fidelity", "--choice"),
    ("retrieval", "--lengths"), ("retrieval", "--depths"), ("retrieval", "--tasks"), ("retrieval", "--cutoffs"),
    ("locate", "--lengths"), ("locate", "--depths"), ("locate", "--tasks"),
    ("frontier", "--prefixes"), ("frontier", "--offsets"), ("frontier", "--retrieval-lengths"),
    ("groups", "--layers"), ("groups", "--sizes"),
    ("patch", "--lengths"), ("patch", "--preset"), ("patch", "--caches"), ("patch", "--plain-caches"),
    ("patch", "--batches"),
]


@pytest.mark.parametrize("empty", ["", ",", " , "])
@pytest.mark.parametrize("name, flag", LIST_OPTIONS)
def test_an_empty_list_is_one_line_and_status_2(no_run, capsys, tmp_path, name, flag, empty):
    with pytest.raises(SystemExit) as exit_:
        command.main([name, "--shape", "tiny", "--out", str(tmp_path), flag, empty])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: argument {flag}: an empty list ({empty!r})")


@pytest.mark.parametrize("argv", [
    ["retrieval", "--preset", ""], ["frontier", "--grid", ""],
    ["retrieval", "--model", ""], ["speed", "--device", ""],
    ["fidelity", "--texts", ""], ["locate", "--out", ""],  # Path("") is the current folder
])
def test_an_empty_name_or_path_is_one_line_and_status_2(no_run, capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        command.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: argument {argv[1]}: an empty ")


def test_every_list_option_refuses_an_empty_list():
    """Each subcommand's list options (their help says comma-separated or shows a list, or their default is one) are
    among those LIST_OPTIONS tests, so a list option added later without the check shows here."""
    import re

    parsers = subparsers()
    for name, parser in parsers.items():
        for action in parser._actions:
            listish = ("comma-separated" in (action.help or "") or "," in str(action.default or "")
                       or re.search(r"\d,\d", action.help or ""))
            if listish and action.type is options.ratios:  # the library's ratio syntax: it refuses "" itself
                assert action.option_strings == ["--ratio"]
                with pytest.raises(argparse.ArgumentTypeError, match=r"merge ratio must be .* \(got ''\)"):
                    action.type("")
            elif listish:
                assert (name, action.option_strings[0]) in LIST_OPTIONS, f"{name} {action.option_strings} is a list"
    for name, flag in LIST_OPTIONS:
        (action,) = [a for a in parsers[name]._actions if flag in a.option_strings]
        assert action.type is options.listed, f"{name} {flag} takes an empty list"


def test_the_list_readers_refuse_an_empty_list_too():
    from slerpviz.bench import schedules
    from slerpviz.bench.retrieval import task_list
    from slerpviz.tasks import TASKS

    with pytest.raises(ValueError, match=r"an empty list \(''\): give at least one length"):
        options.int_list("")
    with pytest.raises(ValueError, match=r"an empty list \(','\): give at least one depth"):
        options.float_list(",", "depth")
    with pytest.raises(ValueError, match=r"an empty list \(' '\): give at least one method"):
        options.str_list(" ", ("slerp", "lerp"), "method")
    with pytest.raises(ValueError, match="an empty list"):
        task_list("")
    assert task_list(None) == TASKS and task_list("multikey") == ("multikey",)
    with pytest.raises(ValueError, match="no cutoff schedule given"):
        schedules.parse(",")


# ----------------------------------------------------------------------------------------------------------------
# --out is checked before the run, not after it
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
@pytest.mark.parametrize("where", ["proc", "file"])
def test_an_out_folder_that_cannot_be_written_is_refused_before_the_run(no_run, subcommand, where, tmp_path, capsys):
    """Once a whole run, then a traceback with status 1 and the results lost."""
    if where == "proc":
        out = "/proc/nope"  # no folder can be made there, not even by root
    else:
        (tmp_path / "taken").write_text("a file where the folder should go")
        out = str(tmp_path / "taken" / "results")
    assert command.main([subcommand, "--shape", "tiny", "--quick", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out}: cannot write the results there (") and err.count("\n") == 1


def test_an_out_folder_made_for_the_check_is_not_left_behind(tmp_path, capsys):
    from slerpviz.bench.options import check_out

    out = tmp_path / "new" / "deeper"
    check_out(out)  # writable: no error
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    check_out(tmp_path / "kept")
    assert (tmp_path / "kept").is_dir()
    # refused for another reason after the check: nothing made stays
    argv = ["retrieval", "--shape", "tiny", "--tasks", "needle", "--out", str(out)]
    assert command.main(argv) == 2 and "unknown task" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("subcommand", ["speed", "retrieval"])
def test_a_merge_flag_no_setting_takes_beside_a_preset_is_refused_before_the_run(no_run, subcommand, tmp_path,
                                                                                 capsys):
    """`retrieval --preset recommended --keep-end 32` ran `recommended` as it is and said nothing of the flag."""
    argv = [subcommand, "--shape", "tiny", "--preset", "recommended", "--keep-end", "32", "--attention-reach", "3",
            "--out", str(tmp_path)]
    assert command.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --keep-end, --attention-reach: --preset sets every merge field") and err.count(
        "\n") == 1


@pytest.mark.parametrize("argv", [["--method", "lerp"], ["--keep-end", "0"], ["--cutoffs", "2", "--keep-end", "4"]])
def test_flags_a_preset_takes_or_that_change_nothing_pass_the_check(argv):
    """How slots are made applies to a preset, a flag at its default changes nothing, and with --cutoffs the flags
    are that setting's."""
    args = subparsers()["retrieval"].parse_args(["--preset", "recommended", *argv])
    options.check_flags_taken(args)


def test_the_default_texts_stay_the_six_top_level_ones_and_a_register_folder_reads_its_own():
    # The register subfolders (assets/texts/legal, ...) widen the tuning set without moving past results: a folder
    # is read non-recursively, so the default set is what every earlier run measured.
    from slerpviz.bench.texts import DEFAULT_TEXTS, read_texts

    assert sorted(name for name, _ in read_texts([])) == sorted(p.stem for p in DEFAULT_TEXTS.glob("*.txt"))
    assert len(read_texts([])) == 6
    # Two texts a register, eight for lists (the twelfth and thirteenth passes wrote more to measure it on 256).
    for register, count in (("technical", 2), ("legal", 2), ("code", 2), ("dialogue", 2), ("lists", 8)):
        texts = read_texts([DEFAULT_TEXTS / register])
        assert len(texts) == count and all(len(text) > 5_000 for _, text in texts), register
