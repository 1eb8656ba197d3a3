"""The whole guided flow in a real browser (Debian's chromium), as a new user would click it.

Screenshots of every step go to tests/artifacts/. Assertions retry until the page shows the
state (Playwright's expect), never after a fixed sleep.
"""

import os
import re
import zipfile

import pytest
from conftest import write_jsonl
from playwright.sync_api import Page, expect, sync_playwright
from ui_helpers import ARTIFACTS, REPO, running_app

from engine import launch

CHROMIUM = "/usr/bin/chromium"
EXAMPLE = REPO / "examples" / "capitals-chat.jsonl"
TRAIN_TIMEOUT_MS = 180_000


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    with running_app(root / "runs", root / "cache") as url:
        yield url, root / "runs"


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("needs Debian's chromium: apt-get install -y chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(app[0])
    yield page
    context.close()


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


def tab(page: Page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def upload(page: Page, path) -> None:
    page.locator("#upload input[type=file]").set_input_files(str(path))


@pytest.mark.slow
def test_upload_train_download_and_try(page, tmp_path, tiny_mistral):
    shot(page, "01-opened")
    upload(page, EXAMPLE)
    expect(page.locator("#data-summary")).to_contain_text("48 examples", timeout=60_000)
    expect(page.get_by_text("Example 1 · line 1")).to_be_visible()
    expect(page.locator(".vega-embed").first).to_be_visible()
    shot(page, "02-data")

    tab(page, "2 · Model and preset")
    expect(page.locator("#memory-estimate")).to_contain_text("GiB")
    expect(page.locator("#command textarea")).to_have_value(re.compile(r"^CUDA_VISIBLE_DEVICES='' accelerate launch"))
    shot(page, "03-model")

    tab(page, "3 · Train")
    page.locator("#start").click()
    expect(page.locator("#progress")).to_contain_text(re.compile(r"step [1-9]\d* of \d+"), timeout=TRAIN_TIMEOUT_MS)
    expect(page.locator("#loss-plot svg path[aria-roledescription='line mark']").first).to_be_attached()
    shot(page, "04-training")
    expect(page.locator("#run-status")).to_contain_text("Finished", timeout=TRAIN_TIMEOUT_MS)
    shot(page, "05-finished")

    tab(page, "4 · Results")
    expect(page.locator("#run-details")).to_contain_text("succeeded")
    with page.expect_download() as download:
        page.locator("#download-adapter").click()
    adapter = tmp_path / "adapter"
    zip_path = tmp_path / "adapter.zip"
    download.value.save_as(zip_path)
    zipfile.ZipFile(zip_path).extractall(adapter)
    shot(page, "06-results")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_mistral), adapter)  # loads

    tab(page, "5 · Try it")
    page.locator("#prompt textarea").fill("What is the capital of France?")
    page.locator("#send").click()
    expect(page.locator("#chat-tuned .message.bot, #chat-tuned [data-testid=bot]").first).to_be_visible(
        timeout=120_000)
    shot(page, "07-try")


def test_a_malformed_file_lists_its_lines_and_start_stays_disabled(page, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "Capital of France?", "completion": " Paris"},
        "{not json",
        {"prompt": "Capital of Italy?"},
    ])  # fmt: skip
    upload(page, bad)
    summary = page.locator("#data-summary")
    expect(summary).to_contain_text("fix these problems", timeout=60_000)
    expect(summary.locator("td", has_text=re.compile(r"^2$"))).to_be_visible()
    expect(summary.locator("td", has_text=re.compile(r"^3$"))).to_be_visible()
    expect(summary).to_contain_text("completion")
    shot(page, "08-bad-data")
    tab(page, "3 · Train")
    expect(page.locator("#start")).to_be_disabled()


@pytest.mark.slow
def test_reload_reattaches_and_stop_ends_every_process(page, app):
    page.locator("#example input").click()
    page.get_by_role("option", name="capitals-chat.jsonl").click()
    expect(page.locator("#data-summary")).to_contain_text("48 examples", timeout=60_000)
    tab(page, "2 · Model and preset")
    epochs = page.locator("#flag-num_train_epochs input")
    epochs.fill("200")
    epochs.press("Tab")
    expect(page.locator("#command textarea")).to_have_value(re.compile(r"--num_train_epochs 200\b"))  # follows the form
    tab(page, "3 · Train")
    page.locator("#start").click()
    expect(page.locator("#progress")).to_contain_text(re.compile(r"step [1-9]\d* of \d+"), timeout=TRAIN_TIMEOUT_MS)

    page.reload()
    tab(page, "3 · Train")
    expect(page.locator("#run-status")).to_contain_text("Training", timeout=30_000)  # slow on 2 busy cores
    expect(page.locator("#progress")).to_contain_text(re.compile(r"step [1-9]\d* of \d+"))
    shot(page, "09-reattached")
    run_id = re.search(r"Run (\S+)", page.locator("#run-status").inner_text()).group(1)
    info = launch.run_status(run_id, app[1])

    # A second tab watches the same run, and its view moves on as the run does.
    second = page.context.new_page()
    second.goto(app[0])
    tab(second, "3 · Train")
    expect(second.locator("#run-status")).to_contain_text(run_id, timeout=30_000)
    step_now = int(re.search(r"step (\d+) of", second.locator("#progress").inner_text()).group(1))
    expect(second.locator("#progress")).not_to_contain_text(f"step {step_now} of", timeout=30_000)
    shot(second, "09b-second-tab")
    second.close()

    page.locator("#stop").click()
    expect(page.locator("#run-status")).to_contain_text("Stopped", timeout=60_000)
    shot(page, "10-stopped")
    # Every process of the run (found by the marker its environment carries) is gone.
    left = launch.run_processes(info)
    assert not left, f"processes of the run left after Stop: {left}"

    tab(page, "4 · Results")
    expect(page.locator("#run-details")).to_contain_text("stopped")
    page.get_by_role("button", name="Resume from its last checkpoint").click()
    expect(page.locator("#run-status")).to_contain_text("Training")  # resumed in its folder, watched in step 3
    assert run_id in page.locator("#run-status").inner_text()
    shot(page, "11-resumed")
    page.locator("#stop").click()
    expect(page.locator("#run-status")).to_contain_text("Stopped", timeout=60_000)
