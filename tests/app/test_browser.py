"""A real browser: Debian's chromium, driven by playwright, against the launched app on 127.0.0.1.

The screenshot goes to test-output/screenshot.png; with SLERPVIZ_UPDATE_SCREENSHOT=1 also to assets/screenshot.png,
the one the README shows.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest


CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "test-output"
# Headless and offline: no sandbox in a container, no GPU, nothing reaching out to the network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
WAIT_MS = 240_000  # a bound against a stuck page; a busy 2-core machine needs far less

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium; run.sh test does it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


@pytest.fixture(scope="module")
def url(app_url):
    return app_url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(WAIT_MS)
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('Ready')")
    yield page
    page.close()


def set_number(page, elem_id: str, value: int) -> None:
    """Type into a slider's number box, as a user does."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def status_has(page, text: str) -> None:
    page.wait_for_function(f"() => document.querySelector('#status')?.innerText.includes({text!r})")


def test_run_fills_both_panels_and_draws_the_plots(page):
    page.fill("#prompt textarea", "Explain in three short sentences why the sky is blue.")
    set_number(page, "cutoff", 12)
    set_number(page, "keep-start", 4)
    set_number(page, "keep-end", 3)
    set_number(page, "keep-recent", 0)  # the opening preset keeps the last 32, most of this short prompt
    set_number(page, "max-new-tokens", 40)
    page.click("#run")

    # The pairing plot comes from the plan, before the generation has finished: on the page's opening preset
    # (recommended, the attention choice) a placeholder until the prompt has run, then the pairs with the spans.
    page.wait_for_selector("#pairing-plot .js-plotly-plot .main-svg")
    assert "Done" not in page.inner_text("#status")

    status_has(page, "Done")
    page.wait_for_function(
        "() => document.querySelector('#pairing-plot')?.innerText.includes('protected: keep_start = 4')")
    base, merged = page.input_value("#base-text textarea"), page.input_value("#merged-text textarea")
    assert base.strip() and merged.strip()
    assert "after layer 12" in page.inner_text("#merged-stats")
    assert "smaller than base" in page.inner_text("#merged-stats")
    # The same update as the status's, which the browser may paint a frame later.
    page.wait_for_function(
        "() => document.querySelector('#comparison')?.innerText.includes('agree position by position')")
    for plot in ("pairing-plot", "length-plot", "latency-plot", "kv-plot"):
        page.wait_for_selector(f"#{plot} .js-plotly-plot .main-svg")
    # Plotly drew real marks: the latency lines of both models and the KV bars.
    assert page.locator("#latency-plot .scatterlayer .trace").count() == 2
    assert page.locator("#kv-plot .barlayer .trace").count() == 2

    page.evaluate("() => window.scrollTo(0, 0)")
    OUTPUT.mkdir(exist_ok=True)
    shot = OUTPUT / "screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000
    if os.environ.get("SLERPVIZ_UPDATE_SCREENSHOT") == "1":
        (ROOT / "assets").mkdir(exist_ok=True)
        shutil.copyfile(shot, ROOT / "assets" / "screenshot.png")


def test_stop_cancels_both_generations(page):
    page.fill("#prompt textarea", "Write a long story about a lighthouse keeper and her cat.")
    set_number(page, "max-new-tokens", 300)
    page.click("#run")
    page.wait_for_function(
        "() => document.querySelector('#merged-text textarea')?.value.length > 20"
        " && document.querySelector('#base-text textarea')?.value.length > 20")
    page.click("#stop")
    status_has(page, "Stopped")
    # Neither panel reached its end; every panel says where the runs stopped, and compares what they generated.
    assert "done" not in page.inner_text("#base-stats") and "done" not in page.inner_text("#merged-stats")
    assert "stopped" in page.inner_text("#base-stats") and "stopped" in page.inner_text("#merged-stats")
    comparison = page.inner_text("#comparison")
    assert "Stopped at token" in comparison and "appears when both" not in comparison
    assert page.locator("#latency-plot .scatterlayer .trace").count() == 2


def test_a_fresh_page_greets_instead_of_complaining(page):
    # Opening the page sets the cutoff controls, which re-plans: with no prompt yet that is a greeting.
    page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('Type a prompt')",
                           timeout=60_000)
    assert "Cannot plan" not in page.inner_text("#status")


def test_the_page_opens_on_the_recommended_preset_with_its_detail_behind_a_click(page):
    from slerpviz import presets

    expected = presets.recommended(30)  # the embedded model's depth
    assert int(float(page.input_value("#cutoff input[type=number]"))) == expected.cutoffs[0]
    page.get_by_text("More merge settings").click()
    assert page.locator("#choice input:checked").get_attribute("value") == expected.choice
    page.wait_for_selector("#attention-window input", state="visible")
    detail = presets.PRESETS["recommended"].description[:60]
    assert not page.get_by_text(detail).is_visible()
    page.get_by_text("What each preset does").click()
    page.get_by_text(detail).wait_for(state="visible")


def test_slider_labels_are_whole(page):
    set_number(page, "max-new-tokens", 512)
    assert page.inner_text("#max-new-tokens [data-testid=max-value]") == "512"
    clipped = page.locator("#max-new-tokens").evaluate(
        "e => [...e.querySelectorAll('*')].filter(x => x.scrollWidth > x.clientWidth).map(x => x.className)")
    assert clipped == []


def test_the_pass_key_example_fills_the_page_from_the_preset(page):
    import re

    from slerpviz import presets

    # The attention numbers show only for the attention choice (toggled before there is a prompt to plan).
    page.get_by_text("More merge settings").click()
    page.locator("#choice").get_by_text("attention", exact=True).click()
    page.wait_for_selector("#attention-window input", state="visible")
    page.locator("#choice").get_by_text("consecutive", exact=True).click()
    page.wait_for_selector("#attention-window input", state="hidden")

    text = (ROOT / "assets" / "examples" / "passkey.txt").read_text(encoding="utf-8")
    answer = re.search(r"The pass key is (\d+)", text).group(1)
    page.get_by_text("Find the pass key (~1,500 tokens)").click()
    page.wait_for_function("() => document.querySelector('#prompt textarea')?.value.endsWith('The pass key is')")
    assert not page.is_checked("#chat input")
    # The plan follows the example: its status and the pairing plot mark the pass key.
    status_has(page, f"pass key {answer}")
    page.wait_for_function(f"() => document.querySelector('#pairing-plot')?.innerText.includes('pass key {answer}')")
    # The merge controls hold the preset, read for the loaded model.
    expected = presets.recommended(30)
    ratio = expected.ratio if isinstance(expected.ratio, float) else expected.ratio[0]
    assert float(page.input_value("#ratio input[type=number]")) == pytest.approx(ratio)
    assert page.locator("#choice input:checked").get_attribute("value") == expected.choice
    if expected.choice == "attention":
        page.wait_for_selector("#attention-window input", state="visible")
        assert int(float(page.input_value("#attention-window input"))) == expected.attention_window
        assert int(float(page.input_value("#attention-reach input"))) == expected.attention_reach
        assert float(page.input_value("#attention-keep-share input")) == expected.attention_keep_share
    page.evaluate("() => window.scrollTo(0, 0)")
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "passkey-example.png"), full_page=True)


def test_the_turbo_preset_keeps_a_layer_it_lists_twice_through_the_browser(page):
    # The further cutoffs menu holds a layer more than once (the preset merges three rounds at layer 12), and the run
    # the browser sends back merges every round: the pairing plot names them.
    page.click("#preset-name input")
    page.get_by_role("option", name="turbo").click()
    page.click("#preset")
    page.fill("#prompt textarea", " ".join(["Write one line on rivers, lakes and the sea."] * 12))
    set_number(page, "max-new-tokens", 4)
    page.click("#run")
    status_has(page, "Done")
    page.wait_for_function(
        "() => document.querySelector('#pairing-plot')?.innerText.includes('after layer 12, round 3')")
    assert "after layer 14, round 3" in page.inner_text("#pairing-plot")


def test_one_pick_in_the_model_menu_switches_once_and_says_why_it_failed(page, url, monkeypatch):
    from slerpviz.app.resident import RESIDENT

    other = "Qwen/Qwen2.5-0.5B-Instruct"
    monkeypatch.setattr(RESIDENT, "_switched_at", None)  # no earlier switch in this process stands in the way

    def unreachable(name, progress):
        raise OSError(f"the hub is unreachable for {name}")

    monkeypatch.setattr(RESIDENT, "_fetcher", unreachable)  # nothing is downloaded, whatever the machine
    config = httpx.get(f"{url}config", timeout=60).json()
    (menu,) = [c["id"] for c in config["components"] if c["props"].get("elem_id") == "model"]
    switch = {d["id"] for d in config["dependencies"] if any(target[0] == menu for target in d["targets"])}
    joins = []
    page.on("request", lambda request: joins.append(json.loads(request.post_data)["fn_index"])
            if "/queue/join" in request.url else None)
    page.click("#model input")
    page.get_by_role("option", name=other).click()
    status_has(page, "Could not load")
    # Every request the pick made was sent before its answer came back: exactly one switch, and its real reason.
    assert len([fn for fn in joins if fn in switch]) == 1, joins
    assert "the hub is unreachable" in page.inner_text("#status")
    assert "at most once every" not in page.inner_text("#status")
    assert RESIDENT.name != other
