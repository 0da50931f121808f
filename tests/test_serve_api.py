"""`sdrecipe serve`'s HTTP API, in process through Starlette's test client: every
route, the token, Host and Origin checks, path confinement, builds (events,
history, cancel, queue), bad input, the new-recipe form and the watcher."""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from starlette.testclient import TestClient

from conftest import invoke, write_recipe
from sdrecipe.engine.options import Options
from sdrecipe.serve.app import create_app
from sdrecipe.serve.builds import Broadcaster, Builds
from sdrecipe.serve.security import cookie_name

TOKEN = "test-token-Az09_-test-token"
PORT = 8765
BASE_URL = f"http://127.0.0.1:{PORT}"
AUTH = {"X-Sdrecipe-Token": TOKEN}
PAUSED_BUILD = Path(__file__).with_name("paused_build.py")
DEADLINE = 60.0
FINISHED = ("succeeded", "failed", "cancelled")
BROKEN = ":3: YAML syntax error: expected ',' or ']', but got '<stream end>'"


@dataclass
class Served:
    """A served folder: its client (lifespan running), the server behind it,
    and where its recipes, outputs and models lie."""

    client: TestClient
    server: Any
    folder: Path
    out: Path
    root: Path
    small: dict[str, Path]

    def get(self, url: str, **kwargs: Any) -> Any:
        return self.client.get(url, headers=AUTH, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Any:
        return self.client.post(url, headers=AUTH, **kwargs)

    def recipes(self) -> dict[str, Any]:
        response = self.get("/api/recipes")
        assert response.status_code == 200, response.text
        return response.json()

    def output(self, file: str, name: str) -> dict[str, Any]:
        row = next(row for row in self.recipes()["recipes"] if row["file"] == file)
        return next(output for output in row["outputs"] if output["name"] == name)

    def build(self, recipe: str, outputs: list[str] | None = None) -> dict[str, Any]:
        body = {"recipe": recipe, **({"outputs": outputs} if outputs is not None else {})}
        response = self.post("/api/build", json=body)
        assert response.status_code == 202, response.text
        return response.json()

    def record(self, build_id: str) -> dict[str, Any]:
        response = self.get(f"/api/builds/{build_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def finished(self, build_id: str) -> dict[str, Any]:
        return wait_for(lambda: _if(self.record(build_id), lambda r: r["state"] in FINISHED))


def _if(value: Any, test: Callable[[Any], bool]) -> Any:
    return value if test(value) else None


def wait_for(probe: Callable[[], Any], timeout: float = DEADLINE, what: str = "") -> Any:
    """Poll `probe` until it returns something truthy; fail after `timeout`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = probe()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting {timeout:.0f} s {what}")


def blend_text(models: dict[str, Path], out: Path, alpha: str = "0.5") -> str:
    return f"""
        inputs:
          A: {models["base"]}
          B: {models["finetune"]}
        nodes:
          mix: weighted_sum(A, B, alpha={alpha})
        outputs:
          mix: {out / "blend.safetensors"}
        """


def make_folder(root: Path, models: dict[str, Path], small: dict[str, Path]) -> Path:
    """The served folder: a blend (small models, quick to build), a block-weighted
    blend, a sweep, a recipe whose input is missing and a broken one."""
    folder, out = root / "recipes", root / "out"
    folder.mkdir()
    out.mkdir()
    write_recipe(folder, blend_text(small, out), "blend.yaml")
    write_recipe(
        folder,
        f"""
        inputs:
          A: {models["base"]}
          B: {models["other"]}
        nodes:
          mix: {{method: weighted_sum, models: [A, B], alpha: "GRAD_V"}}
          keyed: {{method: weighted_sum, models: [A, B], alpha: {{unet: 0.25, default: 0.75}}}}
        outputs:
          mix: {out / "block.safetensors"}
          keyed: {out / "keyed.safetensors"}
        """,
        "block.yaml",
    )
    write_recipe(
        folder,
        f"""
        matrix:
          alpha: [0.25, 0.75]
        inputs:
          A: {small["base"]}
          B: {small["other"]}
        nodes:
          mix: weighted_sum(A, B, alpha=${{alpha}})
        outputs:
          mix: {{path: "{out}/sweep-${{alpha}}.safetensors"}}
        """,
        "sweep.yaml",
    )
    write_recipe(
        folder,
        f"""
        inputs:
          A: {root / "absent.safetensors"}
        nodes:
          copy: A
        outputs:
          copy: {out / "copy.safetensors"}
        """,
        "missing.yaml",
    )
    write_recipe(folder, "inputs:\n  A: [unclosed\n", "broken.yaml")
    return folder


@contextlib.contextmanager
def serving(
    folder: Path, root: Path, small: dict[str, Path], device: str | None = None
) -> Iterator[Served]:
    app = create_app(
        folder,
        Options(cache_dir=root / "cache", device=device),
        TOKEN,
        "127.0.0.1",
        PORT,
        history=root / "history",
        interval=0.2,
    )
    with TestClient(app, base_url=BASE_URL) as client:
        yield Served(client, app.app.state.server, folder.resolve(), root / "out", root, small)


@pytest.fixture
def served(tmp_path: Path, models: dict[str, Path], small_models: dict[str, Path]):
    folder = make_folder(tmp_path, models, small_models)
    with serving(folder, tmp_path, small_models) as served:
        yield served


def one_line_json_error(response: Any) -> str:
    """The error of a refused API request: one line of JSON, no traceback."""
    assert response.headers["content-type"].startswith("application/json"), response.text
    assert "\n" not in response.text.strip() and "Traceback" not in response.text
    error = response.json()["error"]
    assert isinstance(error, str) and error and "\n" not in error
    return error


def files_under(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


# --- the folder, its recipes and their details


def test_recipes_show_each_outputs_status_and_why(served):
    data = served.recipes()
    assert data["version"] >= 1
    rows = {row["file"]: row for row in data["recipes"]}
    assert list(rows) == ["blend.yaml", "block.yaml", "broken.yaml", "missing.yaml", "sweep.yaml"]
    blend = rows["blend.yaml"]["outputs"][0]
    assert blend["name"] == "mix" and blend["status"] == "rebuild"
    assert blend["reason"] == "first build (no lock file)" and blend["exists"] is False
    assert blend["path"] == str(served.out / "blend.safetensors")
    missing = rows["missing.yaml"]["outputs"][0]
    assert missing["status"] == "missing input"
    absent = served.root / "absent.safetensors"
    assert missing["reason"].endswith(f"missing.yaml:2: input 'A': {absent} does not exist")
    broken = rows["broken.yaml"]
    assert broken["outputs"] == [] and broken["error"] == f"{served.folder / 'broken.yaml'}{BROKEN}"
    sweep = rows["sweep.yaml"]
    assert sweep["sweep"] is True and not rows["blend.yaml"]["sweep"]
    assert [(o["name"], o["variables"]) for o in sweep["outputs"]] == [
        ("mix__alpha_0_25", {"alpha": 0.25}),
        ("mix__alpha_0_75", {"alpha": 0.75}),
    ]
    # The same, as the page and its partial show them.
    for url in ("/", "/partials/recipes"):
        page = served.get(url)
        assert page.status_code == 200, page.text
        shown = page.text
        assert 'data-status="missing input"' in shown and 'data-status="rebuild"' in shown
        assert 'data-status="invalid recipe"' in shown and f"broken.yaml{BROKEN[:3]}" in shown
        assert '<a class="tag" href="/sweep?recipe=sweep.yaml">sweep</a>' in shown
    only = served.get("/partials/recipes", params={"recipe": "missing.yaml"}).text
    assert 'data-recipe="missing.yaml"' in only and 'data-recipe="blend.yaml"' not in only


def test_recipe_page_graph_and_folder_graph(served):
    page = served.get("/recipe", params={"recipe": "block.yaml"})
    assert page.status_code == 200
    assert "<h1>block.yaml</h1>" in page.text and 'data-recipe="block.yaml"' in page.text
    assert f'"X-Sdrecipe-Token": "{TOKEN}"' in page.text  # the page's requests carry it
    unknown = served.get("/recipe", params={"recipe": "nope.yaml"})
    assert unknown.status_code == 400 and unknown.text == (
        '<p class="error">no recipe &#x27;nope.yaml&#x27; in the folder</p>'
    )

    graph = served.get("/api/graph", params={"recipe": "blend.yaml"}).json()
    ids = {vertex["id"]: vertex for vertex in graph["vertices"]}
    assert set(ids) == {"input:A", "input:B", "node:mix", "output:mix"}
    assert ids["node:mix"]["status"] == "rebuild"
    assert ids["node:mix"]["detail"] == "weighted_sum(A, B, alpha=0.5)"
    assert sorted(map(tuple, graph["edges"])) == [
        ("input:A", "node:mix"),
        ("input:B", "node:mix"),
        ("node:mix", "output:mix"),
    ]
    folder = served.get("/api/graph").json()
    keys = {vertex["id"] for vertex in folder["vertices"]}
    assert {"blend/node:mix", "block/node:keyed", "sweep/input:A"} <= keys

    partial = served.get("/partials/graph", params={"recipe": "blend.yaml"})
    assert partial.text.startswith('<div class="svg-holder"><svg')
    assert 'data-key="node:mix"' in partial.text
    assert 'data-key="blend/node:mix"' in served.get("/partials/graph").text
    whole = served.get("/graph")
    assert whole.status_code == 200 and "All recipes as one graph" in whole.text


def test_node_detail_shows_the_expression_and_block_and_per_key_tables(served):
    detail = served.get("/api/node", params={"recipe": "block.yaml", "vertex": "node:mix"}).json()
    assert detail["kind"] == "node" and detail["name"] == "mix" and detail["line"] == 5
    assert detail["expression"].startswith("weighted_sum(A, B, alpha={default: 0.5, BASE: 0.0")
    assert "IN00: 1.0" in detail["expression"] and detail["operands"] == ["A", "B"]
    assert detail["status"] == "rebuild" and detail["recipe"] == "block.yaml"
    (call,) = detail["calls"]
    assert call["method"] == "weighted_sum" and call["models"] == ["A", "B"]
    (alpha,) = call["parameters"]
    assert alpha["name"] == "alpha"
    assert alpha["value"] == "the preset GRAD_V (26 values, for SD1/SD2)"
    table = dict(alpha["table"])
    assert len(table) == 27  # SD1's 26 blocks and the default
    assert table["default"] == 0.5 and table["BASE"] == 0.0
    assert table["IN00"] == 1.0 and table["M00"] == 0.0 and table["OUT11"] == 1.0

    keyed = served.get("/api/node", params={"recipe": "block.yaml", "vertex": "node:keyed"})
    (parameter,) = keyed.json()["calls"][0]["parameters"]
    assert dict(parameter["table"]) == {"unet": 0.25, "default": 0.75}

    # The folder graph's vertices name their recipe's stem.
    output = served.get("/api/node", params={"vertex": "block/output:mix"}).json()
    assert output["kind"] == "output" and output["recipe"] == "block.yaml"
    assert output["path"] == str(served.out / "block.safetensors") and output["exists"] is False
    source = served.get("/api/node", params={"vertex": "blend/input:A"}).json()
    assert source["kind"] == "input" and source["family"] == "sd1" and source["exists"] is True

    partial = served.get("/partials/node", params={"recipe": "block.yaml", "vertex": "node:mix"})
    assert partial.status_code == 200
    assert '<table class="per-key">' in partial.text and "<td>IN00</td><td>1</td>" in partial.text
    assert "method <code>weighted_sum</code>(A, B)" in partial.text

    unknown = served.get("/api/node", params={"recipe": "block.yaml", "vertex": "node:nope"})
    assert unknown.status_code == 400
    assert one_line_json_error(unknown) == "block.yaml has no 'node:nope'"


def test_the_folder_graph_of_a_single_recipe_opens_its_boxes(tmp_path, small_models):
    folder = tmp_path / "recipes"
    folder.mkdir()
    write_recipe(folder, blend_text(small_models, tmp_path / "out"), "blend.yaml")
    with serving(folder, tmp_path, small_models) as served:
        keys = [vertex["id"] for vertex in served.get("/api/graph").json()["vertices"]]
        # What app.js sends for a box of the folder graph (its data-recipe is "").
        response = served.get("/partials/node", params={"recipe": "", "vertex": keys[2]})
        assert response.status_code == 200, response.text


def test_the_heatmap_page_of_an_unknown_output_is_refused_in_one_line(served):
    for params in ({"recipe": "blend.yaml", "output": "nope"}, {"recipe": "blend.yaml"}):
        response = served.get("/diff", params=params)
        assert response.status_code == 400, (params, response.text)
        assert "blend.yaml has no output" in response.text


def test_model_pages_inspect_models_in_the_folder_and_those_a_recipe_names(served, models):
    inside = served.folder / "models" / "local.safetensors"
    inside.parent.mkdir()
    shutil.copy(models["inpainting"], inside)
    report = served.get("/api/inspect", params={"path": "models/local.safetensors"}).json()
    assert report["family"] == "sd1" and report["variant"] == "inpainting"
    assert report["path"] == str(inside)
    named = served.get("/api/inspect", params={"path": str(models["other"])})
    assert named.status_code == 200 and named.json()["variant"] == "normal"

    page = served.get("/model", params={"path": "models/local.safetensors"})
    assert page.status_code == 200 and "<h1>local.safetensors</h1>" in page.text
    assert 'hx-get="/partials/model?path=models/local.safetensors"' in page.text
    partial = served.get("/partials/model", params={"path": str(models["other"])})
    assert partial.status_code == 200 and '<dd class="family">sd1 (normal)</dd>' in partial.text

    files = served.get("/api/files").json()["files"]
    assert "models/local.safetensors" in files
    listed = {(served.folder / name).resolve() for name in files}
    named = {models["base"], models["other"], served.small["base"], served.small["finetune"]}
    assert {inside, *(path.resolve() for path in named)} <= listed

    unbuilt = served.get("/api/inspect", params={"path": str(served.out / "blend.safetensors")})
    assert unbuilt.status_code == 404 and "does not exist" in one_line_json_error(unbuilt)


def test_templates_and_the_new_recipe_page(served):
    data = served.get("/api/templates", params={"family": "sd1"}).json()
    names = [template["name"] for template in data["templates"]]
    assert {"inpaint", "weighted", "block", "lora"} <= set(names)
    weighted = next(t for t in data["templates"] if t["name"] == "weighted")
    assert [role["field"] for role in weighted["roles"]] == ["base", "other"]
    assert data["blocks"]["family"] == "sd1" and len(data["blocks"]["blocks"]) == 26
    assert "GRAD_V" in data["blocks"]["presets"]
    page = served.get("/new")
    assert page.status_code == 200
    assert '<option value="weighted">' in page.text and 'name="alpha" value="0.5"' in page.text


# --- the token


def test_the_token_is_needed_and_a_first_visit_sets_its_cookie(served):
    client = served.client
    assert client.get("/").status_code == 403
    refused = client.get("/api/recipes")
    assert refused.status_code == 403 and "session token" in refused.text
    assert client.get("/api/recipes", headers={"X-Sdrecipe-Token": "wrong"}).status_code == 403
    assert client.get("/api/recipes", params={"token": "wrong"}).status_code == 403
    assert client.get("/", params={"token": TOKEN[:-1]}).status_code == 403
    assert client.get("/api/events").status_code == 403
    assert client.get("/partials/recipes").status_code == 403
    assert not client.cookies

    first = client.get("/", params={"token": TOKEN})
    assert first.status_code == 200
    cookie = first.headers["set-cookie"]
    assert cookie.startswith(f"{cookie_name(PORT)}={TOKEN};")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    # Later reads carry the cookie.
    assert client.get("/api/recipes").status_code == 200
    assert client.get("/partials/builds").status_code == 200
    # A change needs the header: the cookie alone, or a wrong header, is refused.
    alone = client.post("/api/build", json={"recipe": "blend.yaml"})
    assert alone.status_code == 403 and "X-Sdrecipe-Token" in alone.text
    wrong = client.post(
        "/api/build", json={"recipe": "blend.yaml"}, headers={"X-Sdrecipe-Token": "x"}
    )
    assert wrong.status_code == 403
    posted = client.post(
        "/api/validate", params={"token": TOKEN}, json={"file": "a.yaml", "text": "x"}
    )
    assert posted.status_code == 403, "?token= is for reads only"
    assert served.server.builds.records == {}, "no build was started"
    # Another server's cookie (another port) does not open this one.
    client.cookies.clear()
    client.cookies.set(cookie_name(PORT + 1), TOKEN)
    assert client.get("/api/recipes").status_code == 403


def test_static_files_are_public_and_confined(served):
    client = served.client
    css = client.get("/static/app.css")
    assert css.status_code == 200 and "text/css" in css.headers["content-type"]
    assert client.get("/static/htmx-2.0.10.min.js").status_code == 200
    for url in (
        "/static/%2e%2e/app.py",
        "/static/..%2fapp.py",
        "/static/%2e%2e/%2e%2e/serve/app.py",
        "/static/%2e%2e/api/recipes",
        "/static/%2e%2e/templates/base.html",
    ):
        response = client.get(url)
        assert response.status_code == 404, url
        assert "create_app" not in response.text and "X-Sdrecipe-Token" not in response.text


# --- Host and Origin


def test_other_hosts_and_origins_are_refused(served):
    client = served.client
    for host in ("evil.example:8765", "evil.example", f"127.0.0.1:{PORT + 1}", "127.0.0.1"):
        response = client.get("/api/recipes", headers={**AUTH, "host": host})
        assert response.status_code == 403 and "Host" in response.text, host
    for host in (f"localhost:{PORT}", f"[::1]:{PORT}"):
        assert client.get("/api/recipes", headers={**AUTH, "host": host}).status_code == 200
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{PORT + 1}"):
        for method in ("GET", "POST"):
            response = client.request(
                method,
                "/api/recipes" if method == "GET" else "/api/validate",
                headers={**AUTH, "origin": origin},
                json={"file": "x.yaml", "text": ""} if method == "POST" else None,
            )
            assert response.status_code == 403 and "Origin" in response.text, (origin, method)
    # The server's own origin is fine, and gets no CORS headers either.
    own = client.get("/api/recipes", headers={**AUTH, "origin": BASE_URL})
    assert own.status_code == 200
    preflight = client.options(
        "/api/build",
        headers={"origin": "http://evil.example", "access-control-request-method": "POST"},
    )
    assert preflight.status_code == 403
    for response in (own, preflight, client.get("/static/app.css")):
        assert not any(name.lower().startswith("access-control") for name in response.headers)
    headers = own.headers
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"


# --- what may be read


def test_paths_outside_the_folder_are_refused(served, models):
    outside = served.root / "outside.safetensors"
    shutil.copy(models["base"], outside)
    (served.root / "secret.txt").write_text("SECRET\n")
    (served.folder / "link.safetensors").symlink_to(outside)
    (served.folder / "linked-dir").symlink_to(served.root)
    refused = [
        "../outside.safetensors",
        "../secret.txt",
        "./../outside.safetensors",
        "models/../../outside.safetensors",
        "../../../../../../etc/passwd",
        str(outside),
        "/etc/passwd",
        "//etc/passwd",
        "link.safetensors",
        "linked-dir/outside.safetensors",
        "linked-dir/secret.txt",
        "blend.yaml\x00",
        "../outside.safetensors\x00.safetensors",
        "",
    ]
    raw = [  # sent as written: percent-encoded escapes the server decodes once
        "%2e%2e/outside.safetensors",
        "%2E%2E%2Foutside.safetensors",
        ".%2e/secret.txt",
        "%2fetc%2fpasswd",
        "..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
        "blend.yaml%00",
        "",
    ]
    urls = [(url, {"path": path}) for url in ("/api/inspect", "/model") for path in refused]
    urls += [(f"{url}?path={path}", None) for url in ("/api/inspect", "/model") for path in raw]
    urls += [("/partials/model", {"path": path}) for path in refused[:3]]
    urls += [("/api/inspect", None), ("/model", None)]  # no path at all
    for url, params in urls:
        response = served.get(url, params=params)
        case = f"{url} {params}"
        assert response.status_code == 403, (case, response.status_code, response.text)
        assert "Traceback" not in response.text and "SECRET" not in response.text, case
        assert "root:" not in response.text, case
        if url.startswith("/api/"):
            one_line_json_error(response)
        else:
            assert response.text.startswith('<p class="error">') and response.text.count("\n") == 0
    # Encoded twice, `%2e%2e` is a name inside the folder: there is no such file.
    twice = served.get("/api/inspect?path=%252e%252e/outside.safetensors")
    assert twice.status_code == 404 and "does not exist" in one_line_json_error(twice)
    # The model a recipe names, outside the folder, stays readable (by either
    # path); the file beside it does not.
    beside = models["base"].with_name("unnamed.safetensors")
    shutil.copy(models["base"], beside)
    relative = f"../../{models['base'].parent.name}"
    for path in (str(beside), f"{relative}/unnamed.safetensors"):
        assert served.get("/api/inspect", params={"path": path}).status_code == 403, path
    for path in (str(models["base"]), f"{relative}/base.safetensors"):
        assert served.get("/api/inspect", params={"path": path}).status_code == 200, path


# --- builds


def read_events(
    served: Served, stop: Callable[[list[tuple[str, dict[str, Any]]]], bool]
) -> tuple[threading.Thread, list[tuple[str, dict[str, Any]]], threading.Event, list[Exception]]:
    """Read /api/events in a thread until `stop(events so far)`, or an event
    named `test-stop` (which `end_reader` publishes if the thread outlives the test)."""
    events: list[tuple[str, dict[str, Any]]] = []
    opened = threading.Event()
    failures: list[Exception] = []

    def read() -> None:
        try:
            with served.client.stream("GET", "/api/events", headers=AUTH) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                kind = ""
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        kind = line.partition(":")[2].strip()
                    elif line.startswith("data:"):
                        events.append((kind, json.loads(line.partition(":")[2])))
                        opened.set()
                        if kind == "test-stop" or stop(events):
                            return
        except Exception as exc:  # shown by the test
            failures.append(exc)
            opened.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, events, opened, failures


def end_reader(served: Served, thread: threading.Thread, timeout: float) -> None:
    thread.join(timeout)
    if thread.is_alive():
        served.client.portal.call(served.server.events.publish, "test-stop", {})
        thread.join(10)
    assert not thread.is_alive(), "the event stream did not end"


def test_a_build_is_relayed_turns_its_outputs_up_to_date_and_is_kept(served):
    assert served.output("blend.yaml", "mix")["status"] == "rebuild"
    wanted: list[str] = []

    def seen_all(events: list[tuple[str, dict[str, Any]]]) -> bool:
        """The build's end, then the reassessment it asks for."""
        ends = [i for i, (kind, data) in enumerate(events) if data.get("state") == "succeeded"]
        return bool(ends) and any(kind == "recipes" for kind, _ in events[ends[0] :])

    thread, events, opened, failures = read_events(served, seen_all)
    assert opened.wait(20) and not failures, failures
    assert events[0] == ("hello", {"version": served.recipes()["version"]})
    started = served.build("blend.yaml")
    wanted.append(started["id"])
    assert started["state"] == "queued" and started["ahead"] == 0
    assert started["target"] == "blend.yaml" and started["recipe"] == "blend.yaml"
    record = served.finished(started["id"])
    assert record["state"] == "succeeded", record
    assert record["exit_code"] == 0 and record["errors"] == []
    (output,) = record["outputs"]
    assert output["output"] == "mix" and output["result"] == "built"
    assert output["path"] == str(served.out / "blend.safetensors") and output["size"] > 0
    summary = record["summary"]
    assert summary["ok"] is True and summary["outputs"][0]["name"] == "mix"
    # The build_finished event, which the pages show, is kept beside `--json`'s summary.
    assert summary["finished"]["type"] == "build_finished" and summary["finished"]["outputs"] == 1
    assert summary["finished"]["cache"]["tensors_computed"] > 0
    assert (served.out / "blend.safetensors").is_file()

    # The event stream: the record's changes, the build's own events, then the
    # reassessment the build's end asks for.
    end_reader(served, thread, 20)
    assert not failures, failures
    states = [data["state"] for kind, data in events if kind == "build"]
    assert states[-1] == "succeeded" and "running" in states, states
    relayed = [data for kind, data in events if kind == "build-event"]
    assert relayed and all(data["build"] == started["id"] for data in relayed)
    types = [data["event"]["type"] for data in relayed]
    assert types[0] == "build_started" and types[-1] == "build_finished"
    assert "output_finished" in types and "progress" in types
    finished = next(data["event"] for data in relayed if data["event"]["type"] == "output_finished")
    assert finished == output
    (end,) = [i for i, (kind, data) in enumerate(events) if data.get("state") == "succeeded"]
    # The build's events file, as kept, holds what was relayed.
    stored = served.get(f"/api/builds/{started['id']}/events")
    assert stored.status_code == 200
    assert stored.headers["content-type"].startswith("application/x-ndjson")
    assert [json.loads(line) for line in stored.text.splitlines()] == [
        data["event"] for data in relayed
    ]
    assert any(kind == "recipes" and data["version"] > 1 for kind, data in events[end:])

    # The server reassessed once the build ended: no request asked it to.
    built = wait_for(
        lambda: _if(served.output("blend.yaml", "mix"), lambda o: o["status"] == "up to date"),
        what="for the built output to be up to date",
    )
    assert built["exists"] is True and built["reason"] == "output matches the lock"

    listing = served.get("/api/builds").json()["builds"]
    assert [build["id"] for build in listing] == [started["id"]]
    page = served.get(f"/builds/{started['id']}")
    assert page.status_code == 200
    assert f"Build {started['id']}" in page.text and '<span class="pill succeeded">' in page.text
    assert "<td>mix</td><td>built</td>" in page.text
    assert "<dt>took</dt>" in page.text and "tensors_computed: " in page.text
    builds = served.get("/partials/builds").text
    assert f'data-build="{started["id"]}" data-state="succeeded"' in builds
    assert re.search(r"1 outputs in \d+\.\d s", builds)
    unknown = served.get("/api/builds/nope")
    assert unknown.status_code == 404 and one_line_json_error(unknown) == "no build 'nope'"
    assert served.get("/builds/nope").status_code == 404

    # What the heatmap compares: the built output against its base (A).
    diff = served.get("/api/diff", params={"recipe": "blend.yaml", "output": "mix"}).json()
    assert diff["base"] == "A"
    (model,) = diff["models"]
    assert 0 < model["total"]["relative_l2"] < 1
    page = served.get("/diff", params={"recipe": "blend.yaml", "output": "mix"})
    assert page.status_code == 200 and "<h1>mix against A</h1>" in page.text
    heatmap = served.get("/partials/diff", params={"recipe": "blend.yaml", "output": "mix"})
    assert heatmap.status_code == 200 and "<svg" in heatmap.text
    assert '<table class="distances">' in heatmap.text
    assert served.get("/api/diff", params={"recipe": "blend.yaml"}).status_code == 400

    # Editing the recipe on disk reassesses it, with no request to rebuild.
    version = served.recipes()["version"]
    write_recipe(served.folder, blend_text(served.small, served.out, "0.25"), "blend.yaml")
    edited = wait_for(
        lambda: _if(served.recipes(), lambda data: data["version"] > version),
        what="for the edited recipe to be reassessed",
    )
    row = next(row for row in edited["recipes"] if row["file"] == "blend.yaml")
    assert row["outputs"][0]["status"] == "rebuild" and row["outputs"][0]["exists"] is True
    assert row["outputs"][0]["reason"] == "alpha changed 0.5 -> 0.25"
    assert served.server.builds.records.keys() == {started["id"]}, "nothing was rebuilt"

    # A new server over the same history lists the build.
    with serving(served.folder, served.root, served.small) as again:
        (kept,) = again.get("/api/builds").json()["builds"]
        assert kept["id"] == started["id"] and kept["state"] == "succeeded"
        assert kept["outputs"] == record["outputs"] and kept["summary"] == record["summary"]
        assert again.get(f"/builds/{started['id']}").status_code == 200


def test_a_sweep_lists_its_variants_then_their_distances(served):
    table = served.get("/api/sweep", params={"recipe": "sweep.yaml"}).json()
    assert table["recipe"] == "sweep.yaml" and table["base"] == "A"
    assert table["variables"] == ["alpha"] and table["components"] == []
    assert [(row["output"], row["variables"], row["built"]) for row in table["rows"]] == [
        ("mix__alpha_0_25", {"alpha": 0.25}, False),
        ("mix__alpha_0_75", {"alpha": 0.75}, False),
    ]
    page = served.get("/sweep", params={"recipe": "sweep.yaml"})
    assert page.status_code == 200 and "<h1>Sweep: sweep.yaml</h1>" in page.text
    assert '<tr data-output="mix__alpha_0_75">' in page.text
    assert "Distances appear once variants are built." in page.text
    not_a_sweep = served.get("/api/sweep", params={"recipe": "blend.yaml"})
    assert not_a_sweep.status_code == 400
    assert one_line_json_error(not_a_sweep) == "blend.yaml has no matrix: it is not a sweep"

    # `mix` names every variant.
    every = served.finished(served.build("sweep.yaml", ["mix"])["id"])
    assert every["state"] == "succeeded", every
    assert sorted(o["output"] for o in every["outputs"]) == ["mix__alpha_0_25", "mix__alpha_0_75"]
    assert every["target"] == "sweep.yaml (mix)"
    wait_for(lambda: served.output("sweep.yaml", "mix__alpha_0_25")["status"] == "up to date")

    table = served.get("/api/sweep", params={"recipe": "sweep.yaml"}).json()
    assert set(table["components"]) == {"unet", "text_encoder", "total"}
    low, high = table["rows"]
    assert low["built"] and high["built"]
    for component in table["components"]:
        assert 0 < low["distance"][component] < high["distance"][component], component
    # weighted_sum(A, B, alpha) moves A by alpha (B - A): three times as far at 0.75.
    assert high["distance"]["total"] == pytest.approx(3 * low["distance"]["total"], rel=1e-3)
    partial = served.get("/partials/sweep", params={"recipe": "sweep.yaml"}).text
    assert '<th data-sort="number">text_encoder</th>' in partial
    assert f"{low['distance']['total']:.4g}" in partial
    assert "Distances appear" not in partial


def pause_builds(served: Served, folder: Path, count: int = 3) -> None:
    """Make the server's next builds pause before their `count`-th key task,
    until FOLDER/resume exists (see paused_build.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    served.server.builds.cli = [sys.executable, str(PAUSED_BUILD), "key", str(count), str(folder)]
    served.server.builds.cli.append("--")


def signal_acted_on(pid: int) -> None:
    """Wait until the build has taken the SIGTERM and, a moment later, run its
    handler: Python runs it on the main thread once that thread gets the GIL,
    which the worker resumed next could otherwise keep until the few small
    keys left were built and publishing had begun (then, by design, the build
    completes its outputs before it exits 130)."""
    wait_for(lambda: signal_taken(pid), what="for the build to take SIGTERM")
    time.sleep(0.5)


def signal_taken(pid: int) -> bool:
    """Whether the process has no signal pending (so SIGTERM was delivered)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return not int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)


def test_builds_of_a_server_with_a_device_compute_on_it(tmp_path, models, small_models):
    """`serve --device` hands the device to its builds (`cpu`: the device path)."""
    folder = make_folder(tmp_path, models, small_models)
    with serving(folder, tmp_path, small_models, device="cpu") as served:
        record = served.finished(served.build("blend.yaml")["id"])
        assert record["state"] == "succeeded", record
        events = served.get(f"/api/builds/{record['id']}/events").text.splitlines()
    notes = [event["message"] for event in map(json.loads, events) if event["type"] == "note"]
    assert "computing on the CPU, by the device path" in notes


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA")
def test_serve_refuses_a_device_before_it_listens(tmp_path):
    (tmp_path / "recipes").mkdir()
    cuda = invoke("serve", str(tmp_path / "recipes"), "--device", "cuda", "--port", "0")
    assert cuda.exit_code == 2 and "built for the CPU only" in cuda.stderr
    capped = invoke("serve", str(tmp_path / "recipes"), "--device-memory", "8GB", "--port", "0")
    assert capped.exit_code == 2 and "--device-memory" in capped.stderr


def test_builds_run_one_at_a_time_and_cancel_cleanly(served):
    first, third = served.root / "first", served.root / "third"
    pause_builds(served, first)
    before_out, before_folder = files_under(served.out), files_under(served.folder)
    running = served.build("blend.yaml")
    try:
        wait_for(lambda: (first / "paused").exists(), what="for the build to pause")
        assert served.record(running["id"])["state"] == "running"
        # More builds wait for the first: they are not run beside it.
        queued = served.build("sweep.yaml")
        assert queued["state"] == "queued" and queued["ahead"] == 1
        later = served.build("sweep.yaml", ["mix__alpha_0_25"])
        assert later["state"] == "queued" and later["ahead"] == 2
        time.sleep(0.3)
        assert served.record(queued["id"])["started_at"] is None
        assert served.server.builds.running.id == running["id"]
        listing = served.get("/partials/builds").text
        assert f'data-build="{queued["id"]}" data-state="queued"' in listing
        assert f'hx-post="/api/builds/{queued["id"]}/cancel"' in listing

        # A queued build is taken off the queue.
        unqueued = served.post(f"/api/builds/{queued['id']}/cancel")
        assert unqueued.status_code == 200 and unqueued.json()["state"] == "cancelled"
        assert served.record(queued["id"])["state"] == "cancelled"

        # The running one is stopped as Ctrl-C stops it; the next one pauses elsewhere.
        pid = served.server.builds.process.pid
        pause_builds(served, third)
        cancelling = served.post(f"/api/builds/{running['id']}/cancel")
        assert cancelling.status_code == 200 and "cancelling" in cancelling.json()["notes"]
        signal_acted_on(pid)
        (first / "resume").touch()
        record = served.finished(running["id"])
        assert record["state"] == "cancelled" and record["exit_code"] == 130, record
        assert record["outputs"] == []
        # Nothing half-written: no output, no temporary file, nothing new beside it.
        assert not (served.out / "blend.safetensors").exists()
        assert files_under(served.out) == before_out == set()
        assert files_under(served.folder) - before_folder == set()
        assert not list(served.root.rglob("*.tmp"))

        # The cancelled queued build is skipped; the last one runs. The first
        # one's end asked for a reassessment, which waits for this build: the
        # server idles meanwhile rather than spinning.
        wait_for(lambda: (third / "paused").exists(), what="for the last build to pause")
        assert served.record(later["id"])["state"] == "running"
        time.sleep(0.2)
        cpu, wall = time.process_time(), time.monotonic()
        time.sleep(1.0)
        busy = (time.process_time() - cpu) / (time.monotonic() - wall)
        assert busy < 0.3, f"the server used {busy:.0%} of a CPU while the build waited"
    finally:
        (first / "resume").touch()
        (third / "resume").touch()
    last = served.finished(later["id"])
    assert last["state"] == "succeeded", last
    assert [o["output"] for o in last["outputs"]] == ["mix__alpha_0_25"]
    assert last["target"] == "sweep.yaml (mix__alpha_0_25)"
    assert sorted(p.name for p in served.out.iterdir()) == ["sweep-0.25.safetensors"]
    never = served.record(queued["id"])
    assert never["state"] == "cancelled" and never["started_at"] is None
    assert never["exit_code"] is None and never["outputs"] == []
    no_events = served.get(f"/api/builds/{queued['id']}/events")
    assert no_events.status_code == 404 and "never started" in one_line_json_error(no_events)
    states = {b["id"]: b["state"] for b in served.get("/api/builds").json()["builds"]}
    assert states == {
        running["id"]: "cancelled",
        queued["id"]: "cancelled",
        later["id"]: "succeeded",
    }
    page = served.get(f"/builds/{running['id']}").text
    assert '<span class="pill cancelled">cancelled</span> (exit 130)' in page
    # Cancelling a finished build changes nothing.
    again = served.post(f"/api/builds/{running['id']}/cancel")
    assert again.status_code == 200 and again.json()["state"] == "cancelled"
    assert served.record(running["id"])["notes"] == ["cancelling"]


# --- bad input


def test_bad_build_requests_are_answered_at_once_with_one_line(served):
    cases = [
        ({"json": {"recipe": "nope.yaml"}}, "no recipe 'nope.yaml' in the folder"),
        ({"json": {"recipe": "../blend.yaml"}}, "no recipe '../blend.yaml' in the folder"),
        (
            {"json": {"recipe": "blend.yaml", "outputs": ["nope"]}},
            "blend.yaml has no output 'nope' (it has: mix)",
        ),
        (
            {"json": {"recipe": "blend.yaml", "outputs": "mix"}},
            '"outputs" must be a list of output names',
        ),
        (
            {"json": {"recipe": "blend.yaml", "outputs": [1]}},
            '"outputs" must be a list of output names',
        ),
        ({"json": {"recipe": 5}}, '"recipe" must be the name of a recipe file in the folder'),
        ({"json": {"outputs": ["mix"]}}, "name a recipe to build single outputs"),
        ({"json": ["blend.yaml"]}, "the request body must be a JSON object"),
        (
            {"content": b"{recipe: blend.yaml", "headers": {"content-type": "application/json"}},
            "the request body is not JSON: ",
        ),
        ({"content": b"x" * ((1 << 20) + 1)}, "request too large"),
    ]
    for kwargs, error in cases:
        headers = {**AUTH, **kwargs.pop("headers", {})}
        response = served.client.post("/api/build", headers=headers, **kwargs)
        assert response.status_code == 400, (kwargs, response.text)
        assert one_line_json_error(response).startswith(error), (kwargs, response.text)
    broken = served.post("/api/build", json={"recipe": "broken.yaml"})
    assert broken.status_code == 400
    assert one_line_json_error(broken) == f"{served.folder / 'broken.yaml'}{BROKEN}"
    unknown = served.post("/api/builds/nope/cancel")
    assert unknown.status_code == 404 and one_line_json_error(unknown) == "no build 'nope'"
    assert served.get("/api/builds").json() == {"builds": []}
    assert served.server.builds.records == {}


def test_validation_answers_with_the_clis_error_text(served, tmp_path):
    text = f"""inputs:
  A: {served.small["base"]}
  B: {served.small["other"]}
nodes:
  mix: weighted_sum(A, Z, alpha=0.5)
outputs:
  mix: mix.safetensors
"""
    answer = served.post("/api/validate", json={"file": "draft.yaml", "text": text})
    assert answer.status_code == 200
    data = answer.json()
    assert data["valid"] is False and data["summary"] is None
    (error,) = data["errors"]
    assert error.startswith(f"{served.folder / 'draft.yaml'}:5: ")
    # `sdrecipe validate` of the same text says the same.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "draft.yaml").write_text(text)
    cli = invoke("validate", str(elsewhere / "draft.yaml"))
    assert cli.exit_code != 0
    assert cli.stderr.strip() == f"error: {error}".replace(str(served.folder), str(elsewhere))
    assert not (served.folder / "draft.yaml").exists()

    good = served.post(
        "/api/validate", json={"file": "draft.yaml", "text": text.replace("Z", "B")}
    ).json()
    assert good["valid"] is True and good["errors"] == []
    assert re.fullmatch(r"valid: mix -> mix \(\d+ keys\)", good["summary"])
    taken = served.post(
        "/api/validate", json={"file": "blend.yaml", "text": text.replace("Z", "B")}
    ).json()
    assert taken["valid"] is False
    assert taken["errors"] == [
        "blend.yaml exists; choose another name (a recipe is never replaced)"
    ]
    yaml = served.post("/api/validate", json={"file": "draft.yaml", "text": "nodes: [\n"}).json()
    assert re.match(rf"{re.escape(str(served.folder))}/draft\.yaml:\d+: YAML", yaml["errors"][0])
    named = served.post("/api/validate", json={"file": "../draft.yaml", "text": text})
    assert named.status_code == 400
    assert one_line_json_error(named).startswith("recipe name '../draft.yaml': a file name")

    check = served.post("/partials/check", data={"file": "draft.yaml", "text": text})
    assert check.status_code == 200
    assert f'<p class="error">{served.folder}/draft.yaml:5: ' in check.text
    valid = served.post("/partials/check", data={"file": "d.yaml", "text": text.replace("Z", "B")})
    assert '<p class="valid">valid: mix -&gt; mix (' in valid.text
    assert 'class="error"' not in valid.text
    badly = html.unescape(
        served.post("/partials/check", data={"file": "a/b.yaml", "text": text}).text
    )
    assert "<p class=\"error\">recipe name 'a/b.yaml': a file name in the folder" in badly


def test_a_new_recipe_is_written_only_when_valid_and_never_over_a_file(served):
    text = blend_text(served.small, served.out, "0.3").replace("blend", "fresh")
    text = "\n".join(line[8:] for line in text.splitlines()) + "\n"
    original = (served.folder / "blend.yaml").read_text()
    (served.folder / "dangling.yaml").symlink_to(served.root / "nowhere.yaml")
    before = files_under(served.root)

    for name in ("blend.yaml", "dangling.yaml"):
        taken = served.post("/api/recipes", json={"file": name, "text": text})
        assert taken.status_code in (400, 409), name
        assert one_line_json_error(taken) == (
            f"{name} exists; choose another name (a recipe is never replaced)"
        )
    assert (served.folder / "blend.yaml").read_text() == original
    assert not (served.root / "nowhere.yaml").exists()
    for name in (
        "../escape.yaml",
        "sub/new.yaml",
        "/tmp/new.yaml",
        "..",
        ".hidden.yaml",
        "new.txt",
        "new.yaml/..",
        "new\x00.yaml",
        "",
    ):
        refused = served.post("/api/recipes", json={"file": name, "text": text})
        assert refused.status_code == 400, name
        assert one_line_json_error(refused).startswith(f"recipe name {name!r}: a file name")
    invalid = served.post(
        "/api/recipes", json={"file": "new.yaml", "text": text.replace("(A, B,", "(A, Q,")}
    )
    assert invalid.status_code == 400
    assert one_line_json_error(invalid).startswith(f"{served.folder / 'new.yaml'}:")
    not_yaml = served.post("/api/recipes", json={"file": "new.yaml", "text": "nodes: ["})
    assert not_yaml.status_code == 400 and "YAML" in one_line_json_error(not_yaml)
    assert files_under(served.root) == before, "nothing was written"

    version = served.recipes()["version"]
    written = served.post("/api/recipes", json={"file": "new.yaml", "text": text})
    assert written.status_code == 201 and written.json() == {"written": "new.yaml"}
    assert (served.folder / "new.yaml").read_text() == text
    assert files_under(served.root) - before == {"recipes/new.yaml"}, "no temporary file left"
    data = wait_for(
        lambda: _if(served.recipes(), lambda d: d["version"] > version and "new.yaml" in str(d)),
        what="for the new recipe to be listed",
    )
    row = next(row for row in data["recipes"] if row["file"] == "new.yaml")
    assert row["outputs"][0]["path"] == str(served.out / "fresh.safetensors")
    assert row["outputs"][0]["status"] == "rebuild"
    again = served.post("/api/recipes", json={"file": "new.yaml", "text": "# other\n" + text})
    assert again.status_code in (400, 409) and "exists" in one_line_json_error(again)
    assert (served.folder / "new.yaml").read_text() == text


def draft(served: Served, **answers: str) -> str:
    response = served.post("/partials/draft", data={"file": "mine.yaml", **answers})
    assert response.status_code == 200, response.text
    return html.unescape(response.text)


def test_the_new_recipe_form_answers_with_the_clis_errors(served, models, tmp_path):
    base, other = str(models["base"]), str(models["other"])
    shown = draft(served, template="weighted", base=base, other=other, alpha="abc")
    assert "<p class=\"error\">--alpha: 'abc' is not a valid float</p>" in shown
    assert "<textarea" not in shown

    shown = draft(served, template="lora", base=base, lora=other)
    error = f"--lora: {other} is not a LoRA / LyCORIS file"
    assert f'<p class="error">{error}</p>' in shown
    cli = invoke(
        "init",
        "--template",
        "lora",
        "--base",
        base,
        "--lora",
        other,
        "--out",
        str(tmp_path / "x.yaml"),
    )
    assert cli.exit_code != 0 and cli.stderr.strip().endswith(f"error: {error}")

    # A model picked from the folder's tree.
    (served.folder / "models").mkdir()
    shutil.copy(models["inpainting"], served.folder / "models" / "inpainting.safetensors")
    inpainting = "models/inpainting.safetensors"
    shown = draft(served, template="inpaint", inpainting=base, finetune=inpainting, base=base)
    combination = (
        "B (--finetune) is an inpainting model; the inpainting model must be the base, "
        "A (--inpainting)"
    )
    assert f'<p class="error">{combination}</p>' in shown
    cli = invoke(
        "init", "--template", "inpaint", "--inpainting", base,
        "--finetune", str(served.folder / inpainting),
        "--base", base, "--out", str(tmp_path / "x.yaml"),
    )  # fmt: skip
    assert cli.stderr.strip().endswith(f"error: {combination}")

    outside = served.root / "outside.safetensors"
    shutil.copy(models["base"], outside)
    shown = draft(served, template="weighted", base=str(outside), other=other)
    assert f"--base: {outside} is outside {served.folder} and no recipe there names it" in shown
    shown = draft(served, template="weighted", base="../outside.safetensors", other=other)
    assert "--base: ../outside.safetensors is outside" in shown
    shown = draft(served, template="weighted", other=other)
    assert "missing --base: The first model" in shown
    assert "template: choose one of" in draft(served, template="nope")

    shown = draft(served, template="weighted", base=base, other=other, alpha="0.3")
    assert "alpha=0.3" in shown and "<textarea" in shown and '<p class="valid">valid: ' in shown
    shown = draft(served, template="block", base=base, other=other, blocks="GRAD_V")
    assert 'data-family="sd1"' in shown and shown.count('data-block="') == 26
    assert 'alpha: "GRAD_V"' in shown and '<p class="valid">valid: ' in shown
    taken = draft(served, template="weighted", base=base, other=other, file="blend.yaml")
    assert "blend.yaml exists; choose another name" in taken
    assert not (served.folder / "mine.yaml").exists()


def test_a_cancel_while_the_build_process_starts_is_not_lost(served):
    """The record says `running` a moment before its process exists: a cancel
    then must still stop the build."""
    builds = served.server.builds

    async def cancel_at_start() -> tuple[str, bool]:
        record = builds.submit("blend.yaml", [])
        while record.state == "queued":
            await asyncio.sleep(0)
        starting = builds.process is None
        await builds.cancel(record.id)
        return record.id, starting

    build_id, starting = served.client.portal.call(cancel_at_start)
    assert starting, "the cancel came before the process existed"
    record = served.finished(build_id)
    assert record["state"] == "cancelled", record
    assert record["outputs"] == [] and not (served.out / "blend.safetensors").exists()


# --- found by the review of the real server


def test_a_malformed_build_summary_in_the_history_is_skipped(tmp_path, small_models):
    """A summary another version, a crash or a hand wrote with other types must
    not break the pages that list the builds: it is skipped like unreadable JSON."""
    history = tmp_path / "history"
    history.mkdir()
    good = {"recipe": "blend.yaml", "outputs_asked": [], "state": "succeeded", "queued_at": 1.0}
    bad = [
        {"outputs_asked": [1, 2]},
        {"recipe": ["blend.yaml"]},
        {"errors": [None]},
        {"outputs": [1]},
        {"outputs": [{"size": "big"}]},
        {"outputs": [{"size": 1, "digest": 5}]},
        {"summary": {"finished": {"seconds": "abc"}}},
        {"summary": {"finished": {"seconds": 1, "cache": [1]}}},
        {"summary": {"finished": "done"}},
        {"queued_at": float("nan")},
        {"progress": {"x.yaml": {"done": float("inf")}}},
    ]
    (history / "20200101-000000-000000.build.json").write_text(json.dumps(good))
    for number, change in enumerate(bad, 1):
        name = f"20200101-0000{number:02d}-0000{number:02d}.build.json"
        (history / name).write_text(json.dumps({**good, **change}))
    folder = tmp_path / "recipes"
    folder.mkdir()
    with serving(folder, tmp_path, small_models) as served:
        listed = served.get("/api/builds")
        assert listed.status_code == 200, listed.text
        assert [b["id"] for b in listed.json()["builds"]] == ["20200101-000000-000000"]
        for url in ("/", "/partials/builds", "/builds/20200101-000000-000000"):
            assert served.get(url).status_code == 200, url


def test_a_second_cancel_does_not_signal_the_build_again(served):
    """Cancel clicked twice: one SIGTERM, as one Ctrl-C (a second one would
    interrupt the CLI's own cleanup), and one note."""
    pause = served.root / "pause"
    pause_builds(served, pause)
    running = served.build("blend.yaml")
    try:
        wait_for(lambda: (pause / "paused").exists(), what="for the build to pause")
        process = served.server.builds.process
        sent: list[int] = []
        send = process.send_signal
        process.send_signal = lambda number: (sent.append(number), send(number))
        for _ in range(3):
            cancelled = served.post(f"/api/builds/{running['id']}/cancel")
            assert cancelled.status_code == 200 and cancelled.json()["notes"] == ["cancelling"]
        assert sent == [signal.SIGTERM]
        wait_for(lambda: signal_taken(process.pid), what="for the build to take SIGTERM")
    finally:
        (pause / "resume").touch()
    record = served.finished(running["id"])
    assert record["state"] == "cancelled" and record["notes"] == ["cancelling"], record


def test_stopping_the_server_keeps_its_builds_as_cancelled(served):
    """Ctrl-C on the server: the running build is kept as cancelled (not as a
    build the server lost), the queued one too, and no queued build starts."""
    pause = served.root / "pause"
    pause_builds(served, pause)
    running = served.build("blend.yaml")
    queued = served.build("sweep.yaml")
    wait_for(lambda: (pause / "paused").exists(), what="for the build to pause")
    pid = served.server.builds.process.pid

    def resume() -> None:
        signal_acted_on(pid)
        (pause / "resume").touch()

    resuming = threading.Thread(target=resume)
    resuming.start()
    try:
        served.client.portal.call(served.server.builds.stop)
    finally:
        (pause / "resume").touch()
        resuming.join()
    kept = {
        path.name.removesuffix(".build.json"): json.loads(path.read_text())
        for path in (served.root / "history").glob("*.build.json")
    }
    assert {key: value["state"] for key, value in kept.items()} == {
        running["id"]: "cancelled",
        queued["id"]: "cancelled",
    }
    assert kept[running["id"]]["exit_code"] == 130
    assert served.server.builds.running is None, "a queued build started while stopping"
    assert not (served.out / "blend.safetensors").exists()


def test_a_new_recipe_has_a_plain_name_and_the_umasks_mode(served):
    text = blend_text(served.small, served.root / "elsewhere", "0.3")
    text = "\n".join(line[8:] for line in text.splitlines()) + "\n"
    for name in ("new.yaml\n", "new.yml\n"):
        refused = served.post("/api/recipes", json={"file": name, "text": text})
        assert refused.status_code == 400, name
        assert one_line_json_error(refused).startswith(f"recipe name {name!r}: a file name")
    assert not any("\n" in path.name for path in served.folder.iterdir())
    written = served.post("/api/recipes", json={"file": "new.yaml", "text": text})
    assert written.status_code == 201, written.text
    mask = os.umask(0o022)
    os.umask(mask)
    assert (served.folder / "new.yaml").stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_new_recipe_may_not_write_another_recipes_output(served):
    """Two recipes writing one file make the whole folder invalid: the form
    says so before the recipe is written."""
    text = blend_text(served.small, served.out, "0.3")  # blend.yaml writes out/blend.safetensors
    text = "\n".join(line[8:] for line in text.splitlines()) + "\n"
    target = served.out / "blend.safetensors"
    expected = (
        f"output 'mix' writes {target}, which output 'mix' of blend.yaml writes too; "
        "choose another output path"
    )
    checked = served.post("/api/validate", json={"file": "new.yaml", "text": text})
    assert checked.status_code == 200 and checked.json()["errors"] == [expected]
    refused = served.post("/api/recipes", json={"file": "new.yaml", "text": text})
    assert refused.status_code == 400 and one_line_json_error(refused) == expected
    assert not (served.folder / "new.yaml").exists()


def test_a_page_opened_mid_build_is_told_of_the_running_build(served):
    """A reload during a build: the new event stream names the running build
    at once (the live panel and its Cancel), not only at its next change."""
    pause = served.root / "pause"
    pause_builds(served, pause)
    running = served.build("blend.yaml")
    try:
        wait_for(lambda: (pause / "paused").exists(), what="for the build to pause")
        thread, events, _, failures = read_events(served, lambda seen: len(seen) >= 2)
        end_reader(served, thread, 10)
        assert not failures, failures
        assert events[0][0] == "hello"
        assert events[1][0] == "build" and events[1][1]["id"] == running["id"]
        assert events[1][1]["state"] == "running"
    finally:
        (pause / "resume").touch()
    assert served.finished(running["id"])["state"] == "succeeded"


def test_an_event_stream_misses_nothing_published_while_it_greets():
    """A snapshot taken as a page connects (the race CI met: a recipe written,
    the list page loaded before the reassessment, its stream opened after it)
    reaches the page: the greeting is taken once the stream is subscribed."""
    broadcaster = Broadcaster()

    def greeting() -> list[tuple[str, dict[str, Any]]]:
        broadcaster.publish("recipes", {"version": 2})  # published meanwhile
        return [("hello", {"version": 1})]

    async def first_two() -> list[tuple[str, dict[str, Any]]]:
        stream = broadcaster.stream(greeting)
        messages = [await anext(stream), await anext(stream)]
        await stream.aclose()
        return messages

    assert asyncio.run(first_two()) == [("hello", {"version": 1}), ("recipes", {"version": 2})]
    assert not broadcaster.subscribers


def test_a_build_the_server_lost_is_still_listed(served):
    """The summary is kept from the build's start: a server killed mid-build
    (kill -9, no time to save) leaves it, listed by the next server as stopped."""
    pause = served.root / "pause"
    pause_builds(served, pause)
    running = served.build("blend.yaml")
    try:
        wait_for(lambda: (pause / "paused").exists(), what="for the build to pause")
        summary = served.root / "history" / f"{running['id']}.build.json"
        assert json.loads(summary.read_text())["state"] == "running"
        # The next server's history (not its lifespan: its first assessment would
        # wait for the cache lock that the paused build holds).
        history = Builds(served.server.workspace, summary.parent, print, print)
        record = history.get(running["id"])
        assert record.state == "failed"
        assert record.errors == ["the server stopped during this build"]
    finally:
        (pause / "resume").touch()
    assert served.finished(running["id"])["state"] == "succeeded"


def test_a_path_that_yaml_would_cut_is_quoted_in_the_drafted_recipe(served, models):
    """`#` starts a YAML comment and `: ` a mapping: the form (and `init`) quote
    such paths, so the recipe writes where it was asked to."""
    base, other = str(models["base"]), str(models["other"])
    for output in ("out/model #2.safetensors", "out/a: b.safetensors"):
        shown = draft(served, template="weighted", base=base, other=other, output=output)
        assert "valid:" in shown, shown
        text = re.search(r"<textarea[^>]*>(.*?)</textarea>", shown, re.S).group(1)
        from sdrecipe.recipe.loader import parse_recipe

        recipe = parse_recipe(text, served.folder / "mine.yaml")
        assert recipe.outputs["merged"].path == (served.folder / output).resolve()


def test_a_recipe_symlinked_from_outside_the_folder_is_not_read(served, tmp_path):
    secret = tmp_path / "secret.yaml"
    secret.write_text("inputs: hunter2-SECRET\n")
    (served.folder / "link.yaml").symlink_to(secret)
    served.server.refresh.set()
    version = served.recipes()["version"]
    data = wait_for(
        lambda: _if(served.recipes(), lambda d: d["version"] > version),
        what="for a new snapshot",
    )
    assert "link.yaml" not in json.dumps(data) and "hunter2" not in json.dumps(data)


def test_a_body_over_the_limit_is_refused_before_it_is_read(served):
    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it is read
        yield b'{"text": "'
        for _ in range(3):
            yield b"x" * (1 << 20)

    json_type = {**AUTH, "Content-Type": "application/json"}
    streamed = served.client.post("/api/validate", content=chunks(), headers=json_type)
    assert streamed.status_code == 400
    assert one_line_json_error(streamed).startswith("request too large")
    form_type = {**AUTH, "Content-Type": "multipart/form-data"}
    form = served.client.post("/api/build", content=b"x=1", headers=form_type)
    assert form.status_code == 400
    assert one_line_json_error(form) == "send JSON, or a URL-encoded form"
