"""`sdrecipe serve` in a real headless Chromium (Debian's, driven by Playwright):
the recipe list and its statuses, a build followed live to "up to date", a
recipe's graph and a node's detail, a heatmap, and the new-recipe form's
errors; with no console error and nothing blocked by the content policy."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path(os.environ.get("SDRECIPE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
START_SECONDS = 60
# Playwright's waits, in milliseconds: a build of the small models takes seconds.
WAIT_MS = 30_000
BUILD_MS = 60_000

if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(
        f"no Chromium at {CHROMIUM} for the browser tests: run `make install-browser` "
        "(or point SDRECIPE_CHROMIUM at one)",
        allow_module_level=True,
    )
try:
    from playwright.sync_api import (
        Browser,
        ConsoleMessage,
        Page,
        Request,
        Response,
        expect,
        sync_playwright,
    )
except ImportError:
    pytest.skip(
        "the browser tests need the playwright package: `make install` "
        "(and `make install-browser` for Chromium)",
        allow_module_level=True,
    )


def write_recipes(folder: Path, models: dict[str, Path], outputs: Path) -> None:
    """Two demo-like recipes (demo_inpaint.yaml, demo_blend.yaml) over `models`."""
    folder.mkdir()
    (folder / "demo_inpaint.yaml").write_text(
        textwrap.dedent(
            f"""\
            inputs:
              A: {models["inpainting"]}
              B: {models["finetune"]}
              C: {models["base"]}
            nodes:
              inpaint: A + (B - C)
            outputs:
              inpaint:
                path: {outputs / "finetune-inpainting.safetensors"}
                dtype: float16
            """
        )
    )
    (folder / "demo_blend.yaml").write_text(
        textwrap.dedent(
            f"""\
            inputs:
              A: {models["finetune"]}
              B: {models["other"]}
              base: {models["base"]}
            nodes:
              blend: weighted_sum(A, B, alpha=0.3)
              final: blend + 0.5 * (B - base)
            outputs:
              final:
                path: {outputs / "blend.safetensors"}
                dtype: float16
            """
        )
    )


def start_server(folder: Path, work: Path) -> tuple[subprocess.Popen[str], str]:
    """`sdrecipe serve FOLDER --port 0` as a process, and the address it prints."""
    log = open(work / "server.log", "w")  # noqa: SIM115 (the process writes it)
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "sdrecipe", "serve", str(folder), "--port", "0"),
            *("--cache-dir", str(work / "cache"), "--history", str(work / "history")),
        ],
        cwd=work,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    log.close()
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, process.stdout)], daemon=True).start()
    try:
        line = lines.get(timeout=START_SECONDS)
        found = re.search(r"at (http://\S+)", line)
        if found is None:
            raise AssertionError(f"sdrecipe serve printed {line!r}, not its address")
        url = found.group(1)
        # The address is printed before the socket listens: wait until it does.
        host, port = re.match(r"http://([^/]+):(\d+)/", url).groups()  # type: ignore[union-attr]
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
    except (OSError, AssertionError, queue.Empty) as exc:
        stop_server(process)
        said = (work / "server.log").read_text()
        raise AssertionError(f"sdrecipe serve did not start ({exc!r}):\n{said}") from None
    except BaseException:
        stop_server(process)
        raise
    return process, url


def stop_server(process: subprocess.Popen[str]) -> None:
    """Stop it as Ctrl-C does, and wait for it."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def served(
    models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """The server on a folder of two recipes: its address, folder and outputs."""
    work = tmp_path_factory.mktemp("serve-browser")
    outputs = work / "out"
    outputs.mkdir()
    write_recipes(work / "recipes", models, outputs)
    process, url = start_server(work / "recipes", work)
    try:
        yield {"url": url, "folder": work / "recipes", "outputs": outputs, "work": work}
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser, served: dict[str, Any]) -> Iterator[Page]:
    """A fresh page on the server's first address (which sets the token's cookie);
    at the end, no console error, uncaught exception or refused request."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    opened = context.new_page()
    problems: list[str] = []

    def console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            problems.append(f"console {message.type}: {message.text}")

    def failed(request: Request) -> None:
        # Not those a navigation cut short, as the event stream's.
        if request.failure != "net::ERR_ABORTED":
            problems.append(f"failed: {request.url} ({request.failure})")

    def answered(response: Response) -> None:
        if response.status >= 400:
            problems.append(f"{response.status}: {response.url}")

    opened.on("console", console)
    opened.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    opened.on("requestfailed", failed)
    opened.on("response", answered)
    opened.set_default_timeout(WAIT_MS)
    expect.set_options(timeout=WAIT_MS)
    opened.goto(served["url"])
    expect(opened.locator("#connection")).to_have_text("live")
    # In the header, not taken for the live build panel (which is `aside.live`).
    expect(opened.locator("#connection")).to_have_css("position", "static")
    try:
        yield opened
        assert opened.locator(".toast").count() == 0, opened.locator(".toast").all_inner_texts()
    finally:
        context.close()
    assert not problems, "\n".join(problems)


def status_cell(page: Page, recipe: str, output: str) -> Any:
    return page.locator(f'tbody[data-recipe="{recipe}"] tr[data-output="{output}"] td.status')


def test_build_graph_and_heatmap(page: Page, served: dict[str, Any]) -> None:
    # The list: both recipes, not built yet.
    expect(status_cell(page, "demo_inpaint.yaml", "inpaint")).to_have_text("rebuild")
    expect(status_cell(page, "demo_blend.yaml", "final")).to_have_text("rebuild")

    # Build one: the live panel follows it, and its status turns up to date.
    page.locator('tbody[data-recipe="demo_inpaint.yaml"] button.build').click()
    live = page.locator("#live")
    expect(live).to_be_visible()
    expect(page.locator("#live-target")).to_have_text("demo_inpaint.yaml")
    expect(live).to_have_attribute("data-state", "succeeded", timeout=BUILD_MS)
    expect(page.locator('#live-outputs li[data-output="inpaint"]')).to_have_attribute(
        "data-result", re.compile(r"\w+")
    )
    expect(page.locator("#live-counts")).to_contain_text("computed")
    expect(status_cell(page, "demo_inpaint.yaml", "inpaint")).to_have_text("up to date")
    expect(status_cell(page, "demo_blend.yaml", "final")).to_have_text("rebuild")
    expect(page.locator("#builds tr[data-state=succeeded]")).to_have_count(1)
    assert (served["outputs"] / "finetune-inpainting.safetensors").is_file()

    # A recipe's page: its graph; a click on a box opens the node's detail.
    page.locator('#recipes a[href="/recipe?recipe=demo_blend.yaml"]').click()
    expect(page.locator("#connection")).to_have_text("live")
    page.locator('#graph svg [data-key="node:blend"]').click()
    detail = page.locator("#node .node-detail")
    expect(detail).to_have_attribute("data-name", "blend")
    expect(detail.locator("code.expression")).to_have_text("weighted_sum(A, B, alpha=0.3)")
    expect(detail.locator("table.parameters")).to_contain_text("alpha")
    page.locator('#graph svg [data-key="input:B"]').click()
    expect(detail).to_have_attribute("data-kind", "input")
    expect(detail).to_contain_text("other.safetensors")

    # The folder's graph: every recipe's boxes, each with its detail.
    page.locator("header nav a", has_text="Folder graph").click()
    page.locator('#graph svg [data-key="demo_inpaint/node:inpaint"]').click()
    expect(detail.locator("code.expression")).to_have_text("A + (B - C)")
    expect(detail.locator(".pill")).to_have_text("up to date")

    # The build's page, and the built model's.
    page.locator("header nav a", has_text="Recipes").click()
    page.locator("#builds tr[data-state=succeeded] a").click()
    expect(page.locator("h1")).to_have_text(re.compile(r"^Build \d{8}-"))
    expect(page.locator("main table tr", has_text="inpaint")).to_have_count(1)
    page.go_back()
    page.locator('tbody[data-recipe="demo_inpaint.yaml"] a', has_text="inspect").click()
    expect(page.locator("#model dd.family")).to_have_text(re.compile(r"^sd1"))
    expect(page.locator("#model ul.lineage")).to_contain_text("A + (B - C)")

    # The built output's heatmap against its base, from the recipe list.
    page.go_back()
    page.locator('tbody[data-recipe="demo_inpaint.yaml"] a', has_text="heatmap").click()
    expect(page.locator("h1")).to_have_text("inpaint against A")
    expect(page.locator("#heatmap .heatmap svg")).to_be_visible()
    expect(page.locator("#heatmap table.distances tr")).not_to_have_count(0)
    page.select_option('select[name="base"]', "B")
    expect(page.locator("h1")).to_have_text("inpaint against B")
    expect(page.locator("#heatmap .heatmap svg")).to_be_visible()


def test_new_recipe_form_errors(page: Page, served: dict[str, Any]) -> None:
    page.locator("header nav a", has_text="New recipe").click()
    expect(page.locator("h1")).to_have_text("New recipe")
    page.select_option("#template", "weighted")
    fields = page.locator('fieldset[data-template="weighted"]')
    expect(fields).to_be_visible()
    files = fields.locator('select[name="base"] option').all_text_contents()
    base = next(name for name in files if name.endswith("finetune.safetensors"))
    other = next(name for name in files if name.endswith("other.safetensors"))
    fields.locator('select[name="base"]').select_option(base)
    fields.locator('select[name="other"]').select_option(other)
    page.fill("#file", "browser_blend.yaml")
    page.fill('input[name="output"]', str(served["outputs"] / "browser-blend.safetensors"))

    # A mistake in a field: the CLI's error text.
    fields.locator('input[name="alpha"]').fill("abc")
    expect(page.locator("#draft .error")).to_have_text(["--alpha: 'abc' is not a valid float"])

    # Corrected: the recipe's text, valid.
    fields.locator('input[name="alpha"]').fill("0.4")
    text = page.locator("#draft-text")
    expect(text).to_have_value(re.compile(r"weighted_sum\(A, B, alpha=0\.4\)"))
    expect(page.locator("#check .valid")).to_contain_text("valid:")

    # A mistake typed into the recipe: the validation's error, then none again.
    written = text.input_value()
    text.fill(written.replace("weighted_sum(", "weighted_summ("))
    expect(page.locator("#check .error")).to_contain_text("weighted_summ")
    expect(page.locator("#check .valid")).to_have_count(0)
    text.fill(written)
    expect(page.locator("#check .valid")).to_contain_text("valid:")

    # Written into the folder, and listed.
    page.locator("#write-recipe").click()
    expect(page.locator("#written")).to_have_text("Wrote browser_blend.yaml.")
    assert (served["folder"] / "browser_blend.yaml").read_text() == written
    page.locator("header nav a", has_text="Recipes").click()
    expect(page.locator('tbody[data-recipe="browser_blend.yaml"] td.status')).to_have_text(
        "rebuild"
    )
