"""The page's own timings, read as a visitor reads them, with the same work on both sides.

Launches the app on the embedded model (`app.py` in --repo, on a free loopback port), opens it in Debian's chromium
through playwright, clicks an example, puts the merged side's cutoff after the last layer and clears the further
cutoffs (its layers then do the base's work), presses Run --runs times, and reads each side's time to first token,
decode rate and elapsed time off its panel. Whatever separates the two sides is the page's own doing: the browser drawing on the
same CPU, the server sending updates, the order the sides step in.

    python scripts/page_timing.py --runs 8 --out assets/results/page-timing-cpu

writes page-timing.json (the machine, the command, every run) and page-timing.csv, and prints each run and the
median ratio merged / base. It times nothing itself and asserts nothing: it is a measurement, run by hand.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from slerpviz.bench.machine import git_commit, machine_info  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
EXAMPLE = "Why is the sky blue? (cutoff 15)"
LAYERS = 30  # the embedded model's depth: a cutoff there merges after the last layer
FIGURES = {  # a panel's row, as the page writes it, and how to read its value
    "first_token_s": re.compile(r"time to first token\s+([\d.]+) s"),
    "tokens_per_s": re.compile(r"tokens per second \([^)]*\)\s+([\d.]+)"),
    "elapsed_s": re.compile(r"elapsed \(own steps\)\s+([\d.]+) s"),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(repo: Path, port: int) -> subprocess.Popen:
    app = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)], cwd=repo,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(240):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                return app
        except httpx.HTTPError:
            pass
        if app.poll() is not None:
            raise SystemExit(f"the app in {repo} exited with status {app.returncode}")
        time.sleep(0.5)
    app.terminate()
    raise SystemExit("the app did not answer within two minutes")


def panel(page, elem_id: str) -> dict:
    text = page.inner_text(f"#{elem_id}")
    return {name: float(found.group(1)) if (found := pattern.search(text)) else None
            for name, pattern in FIGURES.items()}


def measure(url: str, example: str, runs: int, same: bool) -> list[dict]:
    rows = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(240_000)
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('Ready')")
        page.get_by_role("button", name=example).click()
        page.wait_for_timeout(1500)
        if same:
            box = page.locator("#cutoff input[type=number]")
            box.fill(str(LAYERS))
            box.press("Enter")
            for remove in page.locator("button[aria-label^='Remove']").all():
                remove.click()
            page.wait_for_timeout(1000)
        for run in range(runs):
            page.click("#run")
            page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('Generating')")
            page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('Done')")
            page.wait_for_function("() => /tokens generated\\s+\\d+ · done/.test("
                                   "document.querySelector('#merged-stats')?.innerText)")
            base, merged = panel(page, "base-stats"), panel(page, "merged-stats")
            row = {"run": run, **{f"base_{k}": v for k, v in base.items()},
                   **{f"merged_{k}": v for k, v in merged.items()}}
            print(json.dumps(row), flush=True)
            rows.append(row)
            page.wait_for_timeout(1000)
        browser.close()
    return rows


def ratio(rows: list[dict], figure: str) -> float | None:
    values = [row[f"merged_{figure}"] / row[f"base_{figure}"] for row in rows
              if row[f"merged_{figure}"] and row[f"base_{figure}"]]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8, help="presses of Run (default 8)")
    parser.add_argument("--example", default=EXAMPLE, help=f"the example button to click (default {EXAMPLE!r})")
    parser.add_argument("--as-given", action="store_true",
                        help="keep the example's merge settings instead of the same work on both sides")
    parser.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose app.py runs (default this one)")
    parser.add_argument("--out", type=Path, help="folder for page-timing.json and page-timing.csv")
    args = parser.parse_args(argv)
    port = free_port()
    app = launch(args.repo.resolve(), port)
    try:
        rows = measure(f"http://127.0.0.1:{port}/", args.example, args.runs, same=not args.as_given)
    finally:
        app.terminate()
        app.wait(timeout=30)
    summary = {figure: ratio(rows, figure) for figure in FIGURES}
    print(f"n = {len(rows)} runs; median merged / base: " +
          ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if v is not None))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        info = {**machine_info(torch.device("cpu")), "command": " ".join(["python", *sys.argv]),
                "app_commit": git_commit(args.repo.resolve())}  # the app that was timed
        (args.out / "page-timing.json").write_text(json.dumps(
            {"benchmark": "page-timing", "machine": info, "example": args.example, "same_work": not args.as_given,
             "summary": summary, "rows": rows}, indent=1) + "\n")
        with open(args.out / "page-timing.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
