"""scripts/page_timing.py, the measurement of the page's own timings, run once end to end: it must still find the
example, the controls and every figure it reads off the panels (a renamed row would leave it reading nothing)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if not Path("/usr/bin/chromium").exists():
    pytest.skip("/usr/bin/chromium is missing (apt-get install chromium; run.sh test does it)", allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


def page_timing():
    spec = importlib.util.spec_from_file_location("page_timing", ROOT / "scripts" / "page_timing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_page_timing_reads_both_sides_figures_with_the_same_work_on_each(tmp_path):
    assert page_timing().main(["--runs", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "page-timing.json").read_text())
    (row,) = result["rows"]
    figures = ("first_token_s", "tokens_per_s", "elapsed_s")
    read = [row[f"{side}_{figure}"] for side in ("base", "merged") for figure in figures]
    assert all(value is not None and value > 0 for value in read), row
    assert result["same_work"] and set(result["summary"]) == set(figures)
    assert result["machine"]["app_commit"]  # which app was timed
    assert (tmp_path / "page-timing.csv").read_text().startswith("run,base_first_token_s")
