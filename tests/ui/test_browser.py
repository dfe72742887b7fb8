"""The web UI in a real browser: headless Debian chromium driven by Playwright (no browser download).

One server over a workspace with a tiny base, a tuned adapter and its merge (see served.py); the page is
checked to render with no request leaving the server, a reply to stream, two models to answer side by
side, and a training run to start, plot, advance, stop with a checkpoint, resume and fail without taking
the server down.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from served import CHROMIUM, server, workspace  # noqa: F401 - fixtures

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = Path(os.environ["ALPACA_LORA_UI_SCREENSHOTS"]) if os.environ.get("ALPACA_LORA_UI_SCREENSHOTS") else None
"""Where to save the docs' screenshots of each tab (docs/images): ALPACA_LORA_UI_SCREENSHOTS=docs/images pytest ..."""


def shoot(page, name: str) -> None:
    if SHOTS is not None:
        page.wait_for_timeout(1000)
        page.screenshot(path=str(SHOTS / name), full_page=True)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: the browser tests drive Debian's chromium (apt-get install -y chromium; "
                    ".ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):  # noqa: F811 - the fixture
    url, _ = server
    tab = browser.new_page(viewport={"width": 1280, "height": 1000})
    tab.outside = []
    tab.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else tab.outside.append(r.url))
    tab.goto(url)
    tab.wait_for_selector("#chat-input textarea", timeout=60_000)
    yield tab
    tab.close()


def pick(page, elem_id: str, label: str) -> None:
    """Choose ``label`` in the Gradio drop-down ``#elem_id``."""
    page.locator(f"#{elem_id} input").click()
    page.locator(f"#{elem_id} [data-testid='dropdown-option']", has_text=label).first.click()
    page.wait_for_timeout(300)


def set_number(page, elem_id: str, value: object) -> None:
    box = page.locator(f"#{elem_id} input")
    box.fill(str(value))
    box.press("Tab")


def bot_texts(page, elem_id: str) -> list[str]:
    return page.locator(f"#{elem_id} [data-testid='bot']").all_inner_texts()


def record_reply_lengths(page, elem_id: str) -> None:
    """Record the length of the last bot message at every change of the chatbot (the stream, seen by the page)."""
    page.evaluate("""(id) => {
        window.lengths = [];
        const root = document.getElementById(id);
        new MutationObserver(() => {
            const bots = root.querySelectorAll("[data-testid='bot']");
            if (bots.length) window.lengths.push(bots[bots.length - 1].innerText.length);
        }).observe(root, {subtree: true, childList: true, characterData: true});
    }""", elem_id)


def text(page, elem_id: str) -> str:
    """The text of ``#elem_id`` ("" while it is not rendered)."""
    box = page.locator(f"#{elem_id}")
    return box.inner_text(timeout=2000) if box.count() else ""


def status_step(page) -> int:
    match = re.search(r"step (\d+)", text(page, "train-status"))
    return int(match.group(1)) if match else 0


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5, page=None):
    """The first true value of ``predicate()``; on timeout, an error with the page's messages and status."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    seen = "" if page is None else " ".join(
        f"{e}: {text(page, e)!r}" for e in ("train-message", "train-status", "runs-action"))
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; {seen}")


def test_page_renders_offline_on_loopback(page, server):  # noqa: F811
    url, _ = server
    assert url.startswith("http://127.0.0.1:")
    for name in ("Chat", "Train", "Runs"):
        assert page.get_by_role("tab", name=name).is_visible()
    page.get_by_role("tab", name="Runs").click()
    page.wait_for_timeout(1500)
    assert page.outside == [], f"the page asked for outside resources: {page.outside[:5]}"


def test_chat_streams_a_reply(page):
    pick(page, "chat-model", "tuned (adapter)")
    record_reply_lengths(page, "chat-a")
    page.locator("#chat-input textarea").fill("Name the color of the sky.")
    page.locator("#chat-send").click()
    wait_for(lambda: bot_texts(page, "chat-a") and bot_texts(page, "chat-a")[-1].strip(), 90, "a reply", page=page)
    page.wait_for_timeout(2000)
    lengths = page.evaluate("window.lengths")
    grown = sorted(set(n for n in lengths if n > 0))
    assert len(grown) >= 3, f"the reply did not stream (lengths seen: {lengths[:40]})"
    assert lengths.index(grown[0]) < lengths.index(grown[-1]), "the reply shrank instead of growing"
    assert bot_texts(page, "chat-a")[-1].strip()  # the reply stays on the page once streamed


def test_side_by_side_merged_and_base(page):
    pick(page, "chat-model", "tuned-merged (merged)")
    pick(page, "chat-compare", "base-tiny (model)")
    page.wait_for_selector("#chat-b", state="visible")
    page.locator("#chat-input textarea").fill("What is two plus two?")
    page.locator("#chat-send").click()
    wait_for(lambda: all(bot_texts(page, e) and bot_texts(page, e)[-1].strip() for e in ("chat-a", "chat-b")), 120,
             "both replies")
    user_a = page.locator("#chat-a [data-testid='user']").all_inner_texts()
    user_b = page.locator("#chat-b [data-testid='user']").all_inner_texts()
    assert user_a[-1].strip() == user_b[-1].strip() == "What is two plus two?"
    shoot(page, "ui_chat.png")


@pytest.mark.slow
def test_train_start_watch_stop_resume(page, workspace):  # noqa: F811
    page.get_by_role("tab", name="Train").click()
    pick(page, "train-data", "data.json")
    pick(page, "train-base", "base-tiny (model)")
    page.locator("#train-name input, #train-name textarea").first.fill("ui-run")
    for name, value in (("max_steps", 5000), ("batch_size", 4), ("micro_batch_size", 4), ("cutoff_len", 64),
                        ("val_set_size", 4), ("eval_steps", 3), ("save_steps", 1000), ("lora_r", 4),
                        ("lora_alpha", 8)):
        set_number(page, f"train-{name}", value)
    pick(page, "train-quantization", "none")
    page.locator("#train-inspect-button").click()
    report = wait_for(lambda: "training:" in text(page, "train-inspect")
                      and text(page, "train-inspect"), 90, "the inspection report")
    assert "32 read" in report and "truncated" in report and "dropped" in report and "example" in report

    page.locator("#train-start").click()
    wait_for(lambda: "started ui-run" in text(page, "train-message"), 30, "the start message", page=page)
    first = wait_for(lambda: status_step(page), 180, "the first logged step", page=page)
    later = wait_for(lambda: status_step(page) > first + 1 and status_step(page), 120, "the step counter to advance",
                     page=page)
    assert later > first
    status = text(page, "train-status")
    assert "/5000" in status and "loss" in status and "tokens/s" in status and "ETA" in status and "lr" in status
    wait_for(lambda: page.locator("#train-loss canvas, #train-loss svg").count() > 0, 30, "the loss plot", page=page)
    wait_for(lambda: "eval loss" in text(page, "train-status"), 60, "an eval loss", page=page)
    shoot(page, "ui_train.png")

    page.locator("#train-stop").click()
    wait_for(lambda: "exit status 143" in text(page, "train-status"), 120, "the run to stop", page=page)
    status = text(page, "train-status")
    saved = re.search(r"checkpoints: (checkpoint-\d+)", status)
    assert saved, status
    assert (workspace / "ui-run" / saved.group(1)).is_dir()
    stopped_at = int(saved.group(1).split("-")[1])

    page.get_by_role("tab", name="Runs").click()
    page.locator("#runs-refresh").click()
    pick(page, "runs-folder", "ui-run (")
    wait_for(lambda: saved.group(1) in text(page, "runs-summary"), 30, "the checkpoint in Runs", page=page)
    shoot(page, "ui_runs.png")

    page.get_by_role("tab", name="Train").click()
    page.locator("#train-resume").click()
    wait_for(lambda: "resumed ui-run" in text(page, "train-message"), 30, "the resume message", page=page)
    wait_for(lambda: "running" in text(page, "train-status")
             and status_step(page) > stopped_at + 1, 180, "the resumed run to pass its checkpoint")
    page.locator("#train-stop").click()
    wait_for(lambda: "exit status 143" in text(page, "train-status"), 120, "the second stop", page=page)
    log = (workspace / "ui-run" / "train.log").read_text()
    assert "--resume_from_checkpoint true" in log


@pytest.mark.slow
def test_a_crashing_run_shows_its_error_and_the_ui_keeps_working(page):
    page.get_by_role("tab", name="Train").click()
    pick(page, "train-data", "bad.json")
    pick(page, "train-base", "base-tiny (model)")
    page.locator("#train-name input, #train-name textarea").first.fill("bad-run")
    pick(page, "train-quantization", "none")
    page.locator("#train-start").click()
    wait_for(lambda: "exit status 1)" in text(page, "train-status"), 180, "the run to fail", page=page)
    assert "error" in page.locator("#train-log textarea").input_value()
    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-input textarea").fill("Still there?")
    page.locator("#chat-send").click()
    wait_for(lambda: bot_texts(page, "chat-a") and bot_texts(page, "chat-a")[-1].strip(), 90,
             "a reply after the crash", page=page)
