"""The web view's screenshots in docs/ (`make screenshots`): `sdrecipe serve` on
copies of the demo recipes (over the demo models, made when absent), driven in
Debian's headless Chromium by Playwright. Nothing in the repository changes but
the three PNGs: the recipes, their outputs, the cache and the build history
live in a temporary folder, removed at the end.

  docs/web-recipe-graph.png  a recipe's page: its DAG, a node clicked
  docs/web-build.png         the folder's build in progress (the live panel)
  docs/web-sweep.png         the sweep table of a `matrix:` recipe, built
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DEMO = ROOT / "build" / "demo"
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
VIEWPORT = {"width": 1400, "height": 900}
DEMO_RECIPES = ("demo_inpaint", "demo_blend", "demo_pix2pix", "demo_lora", "demo_flux_fill")
# The sweep: a blend at four weights, each with a noise offset at two strengths; one
# node, so that the table's base (the first input its node reads) is A.
SWEEP = """\
# A sweep over the demo models: a blend of two fine-tunes at four weights, each
# with the noise-offset difference at two strengths (8 variants).
matrix:
  alpha: [0.2, 0.4, 0.6, 0.8]
  strength: [0.5, 1.0]
inputs:
  A: {demo}/sd15-finetune.safetensors
  B: {demo}/sd15-other-finetune.safetensors
  base: {demo}/sd15-base.safetensors
  noise_offset: {demo}/sd15-noise-offset.safetensors
nodes:
  final: weighted_sum(A, B, alpha=${{alpha}}) + ${{strength}} * (noise_offset - base)
outputs:
  final:
    path: "{out}/sweep-${{alpha}}-${{strength}}.safetensors"
    dtype: float16
"""
WAIT_MS = 120_000
# Whether the live panel shows a merge half done (the moment for web-build.png).
MIDWAY = """() => Array.from(document.querySelectorAll("#live-progress .progress-row")).some(
  (row, index, rows) => rows.length >= 3 && index === rows.length - 1
    && row.textContent.includes("merging") && row.querySelector("progress").position > 0.3
    && row.querySelector("progress").position < 0.8)"""


def demo_models() -> None:
    """The demo's synthetic models in build/demo, made if any is missing."""
    wanted = ("sd15-base", "sd15-other-finetune", "sd15-noise-offset", "flux1-fill")
    if all((DEMO / f"{name}.safetensors").is_file() for name in wanted):
        return
    print(f"making the demo models in {DEMO.relative_to(ROOT)}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "sdrecipe.synthetic", "demo", str(DEMO)], cwd=ROOT, check=True
    )


def copy_recipes(folder: Path, out: Path) -> None:
    """The demo recipes, their inputs pointed at build/demo and their outputs at
    `out`; and the sweep."""
    folder.mkdir()
    out.mkdir()
    for name in DEMO_RECIPES:
        section, lines = "", []
        for line in (ROOT / "recipes" / f"{name}.yaml").read_text().splitlines(keepends=True):
            if re.match(r"^[a-z_]+:", line):
                section = line.split(":")[0]
            target = out if section == "outputs" else DEMO
            lines.append(line.replace("../build/demo", str(target)))
        (folder / f"{name}.yaml").write_text("".join(lines))
    (folder / "demo_sweep.yaml").write_text(SWEEP.format(demo=DEMO, out=out))


def start_server(folder: Path, work: Path) -> tuple[subprocess.Popen[str], str]:
    """`sdrecipe serve FOLDER --port 0` on a temporary cache and history, and the
    address it prints, once it answers."""
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
        found = re.search(r"at (http://\S+)", lines.get(timeout=60))
        if found is None:
            raise RuntimeError("no address printed")
        host, port = re.match(r"http://([^/]+):(\d+)/", found.group(1)).groups()
        deadline = time.monotonic() + 60
        while True:  # the address is printed before the socket listens
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
    except BaseException:
        stop_server(process)
        sys.exit("sdrecipe serve did not start:\n" + (work / "server.log").read_text())
    return process, found.group(1)


def stop_server(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def screenshots(url: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(WAIT_MS)
            expect.set_options(timeout=WAIT_MS)
            problems: list[str] = []
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on(
                "console",
                lambda message: problems.append(message.text) if message.type == "error" else None,
            )
            page.goto(url)
            expect(page.locator("#connection")).to_have_text("live")
            expect(page.locator("td.status").first).to_be_visible()

            # The folder's build, caught while a third recipe is half merged.
            page.locator("button.build", has_text="Build the folder").click()
            page.locator("#live-progress progress").first.wait_for()
            deadline = time.monotonic() + WAIT_MS / 1000
            while time.monotonic() < deadline and not page.evaluate(MIDWAY):
                if page.get_attribute("#live", "data-state") != "running":
                    sys.exit("the build ended before the moment for web-build.png")
                time.sleep(0.02)
            page.screenshot(path=DOCS / "web-build.png")
            print("docs/web-build.png", flush=True)
            expect(page.locator("#live")).to_have_attribute(
                "data-state", re.compile("succeeded|failed|cancelled")
            )
            expect(page.locator("#live")).to_have_attribute("data-state", "succeeded")
            expect(page.locator("td.status", has_text="rebuild")).to_have_count(0)

            # A recipe's graph with a node clicked.
            page.goto(url.split("?")[0] + "recipe?recipe=demo_blend.yaml")
            page.locator('#graph svg [data-key="node:blend"]').click()
            expect(page.locator("#node .node-detail")).to_have_attribute("data-name", "blend")
            page.mouse.move(0, 0)
            page.screenshot(path=DOCS / "web-recipe-graph.png")
            print("docs/web-recipe-graph.png", flush=True)

            # The sweep's table, with its distances, sorted by one of them.
            page.goto(url.split("?")[0] + "sweep?recipe=demo_sweep.yaml")
            expect(page.locator("#sweep table.sweep th").nth(4)).to_be_visible()
            page.locator("#sweep table.sweep th", has_text="unet").click()
            page.screenshot(path=DOCS / "web-sweep.png")
            print("docs/web-sweep.png", flush=True)
            if problems:
                sys.exit("the page reported errors:\n" + "\n".join(problems))
        finally:
            browser.close()


def main() -> None:
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        sys.exit(f"no Chromium at {CHROMIUM}: run `make install-browser` (or SDRECIPE_CHROMIUM=)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        sys.exit("the screenshots need the playwright package: `make install`")
    demo_models()
    work = Path(tempfile.mkdtemp(prefix="sdrecipe-screenshots-"))
    process = None
    try:
        copy_recipes(work / "recipes", work / "out")
        process, url = start_server(work / "recipes", work)
        screenshots(url)
    finally:
        if process is not None:
            stop_server(process)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
