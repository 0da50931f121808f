"""The process around a build: Ctrl-C and SIGTERM always stop it with exit 130 and
nothing half-written, whatever the build was doing when the signal landed;
usage errors are clear, and print the JSON error object under --json."""

from __future__ import annotations

import contextlib
import json
import signal
import socketserver
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_in_process, start_paused_build, write_recipe
from sdrecipe import methods  # noqa: F401  (registers every method)
from sdrecipe.cache.store import OBJECT, Cache, Location
from sdrecipe.engine.builder import update_outputs
from sdrecipe.methods.registry import MergeMethod, get_method, registered_methods
from sdrecipe.plan.prepare import prepare
from sdrecipe.recipe.per_key import KeyContext

STOPS = pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])


def signal_and_resume(process, sent: signal.Signals, folder: Path) -> str:
    """Send `sent` to the paused build, wait until the process has taken it (so it
    certainly landed while the build was paused), let the build go on, and
    return its stderr once it ends."""
    process.send_signal(sent)
    status = Path(f"/proc/{process.pid}/status")
    bit = 1 << (sent - 1)
    while status.exists():
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        if not (int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)) & bit:
            break
        time.sleep(0.005)
    (folder / "resume").touch()
    _, stderr = process.communicate(timeout=120)
    return stderr


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


@contextlib.contextmanager
def sigint_ignored():
    """Start processes as a shell starts a background job: with SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture
def one_output(tmp_path, small_models):
    """The small models (39 keys): a build paused at its 20th key or cache object
    is as certainly mid-way as one of 1131 keys."""
    models = small_models
    return write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["inpainting"]}, B: {models["finetune"]}, C: {models["base"]}}}
        nodes:
          diff: {{expression: B - C, cache: true}}
          out: A + 1.0 * diff
        outputs: {{out: {{path: out.safetensors, dtype: fp32}}}}
        """,
    )


@STOPS
@pytest.mark.parametrize("inherited", ["default", "sigint-ignored"])
def test_a_stop_signal_while_a_worker_computes_stops_the_build(
    tmp_path, one_output, sent, inherited
):
    signals = tmp_path / "signals"
    with sigint_ignored() if inherited == "sigint-ignored" else contextlib.nullcontext():
        process = start_paused_build("key", 20, signals, "build", "-j", "1", str(one_output))
    stderr = signal_and_resume(process, sent, signals)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out.safetensors").exists()
    assert temporaries(tmp_path) == []


@STOPS
def test_a_stop_signal_during_a_cache_write_leaves_only_complete_entries(
    tmp_path, one_output, isolated_cache, sent
):
    signals = tmp_path / "signals"
    process = start_paused_build("object", 20, signals, "build", "-j", "1", str(one_output))
    stderr = signal_and_resume(process, sent, signals)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out.safetensors").exists()
    assert temporaries(tmp_path) == []
    objects = sorted(isolated_cache.glob("objects/*/*.safetensors"))
    assert len(objects) >= 19
    cache = Cache(isolated_cache)
    for path in objects:  # each verifies against the digest it is named by
        digest = path.name.removesuffix(".safetensors")
        cache.open_entry(Location(OBJECT, digest, "tensor", digest))
    again = run_in_process("build", "--json", str(one_output))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["cache"]["corrupt_entries"] == 0


@STOPS
def test_a_stop_signal_while_publishing_completes_the_outputs_and_lock_then_exits_130(
    tmp_path, small_models, sent
):
    models = small_models
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["finetune"]}, B: {models["other"]}}}
        nodes: {{mix: "weighted_sum(A, B, alpha=0.3)", far: "weighted_sum(A, B, alpha=0.7)"}}
        outputs: {{mix: mix.safetensors, far: far.safetensors}}
        """,
    )
    signals = tmp_path / "signals"
    # Paused in the main thread, between renaming the first output and the second.
    process = start_paused_build("publish", 2, signals, "build", "--no-cache", str(recipe))
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    stderr = signal_and_resume(process, sent, signals)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert temporaries(tmp_path) == []
    # All or none: both outputs and the lock that describes them are in place.
    again = run_in_process("build", "--json", str(recipe))
    assert again.returncode == 0, again.stderr
    states = {o["name"]: o["result"] for o in json.loads(again.stdout)["outputs"]}
    assert states == {"mix": "up to date", "far": "up to date"}


# --- seeded and key-aware methods: every parameter is part of the identity ---------

# Every registered method with a seed or told its key: a new one is covered too.
KEYED_METHODS = [
    method
    for method in registered_methods()
    if method.key_aware or "seed" in method.parameters.model_fields
]


def another_value(method: MergeMethod, name: str) -> str:
    """A valid value of parameter `name` other than its default, as expression text."""
    field = method.parameters.model_fields[name]
    default = field.default
    choices = typing.get_args(field.annotation)
    if typing.get_origin(field.annotation) is typing.Literal:
        return next(choice for choice in choices if choice != default)
    if isinstance(default, bool):
        return "false" if default else "true"
    if isinstance(default, int):
        return str(default + 7)
    return repr(0.5 if default != 0.5 else 0.25)


@pytest.mark.parametrize(
    ("method", "parameter"),
    [(m.name, p) for m in KEYED_METHODS for p in m.parameters.model_fields],
)
def test_changing_any_parameter_of_a_seeded_or_key_aware_method_rebuilds_it(
    tmp_path, small_models, method, parameter
):
    # The small models (39 keys) are enough to tell identities and bytes apart.
    models = small_models
    assert {"dare", "dare_ties"} <= {m.name for m in KEYED_METHODS}
    cache = Cache(tmp_path / "cache")
    recipe_text = """
        inputs: {{A: {A}, B: {B}, C: {C}}}
        nodes: {{out: "{call}"}}
        outputs: {{out: {{path: out.safetensors, dtype: float32}}}}
        """
    inputs = {"A": models["finetune"], "B": models["other"], "C": models["base"]}

    def build_with(call: str, use_cache: bool) -> tuple[str, bytes]:
        recipe = write_recipe(tmp_path, recipe_text.format(call=call, **inputs))
        update_outputs(
            prepare(recipe), threads=2, cache=cache if use_cache else None, force=not use_cache
        )
        node_id = yaml.safe_load(recipe.with_suffix(".lock").read_text())["nodes"]["out"][
            "identity"
        ]
        return node_id, (tmp_path / "out.safetensors").read_bytes()

    first_id, _ = build_with(f"{method}(C, A, B)", use_cache=True)
    changed = f"{method}(C, A, B, {parameter}={another_value(get_method(method), parameter)})"
    changed_id, cached = build_with(changed, use_cache=True)
    assert changed_id != first_id, f"{method}'s {parameter} is not part of the node's identity"
    _, fresh = build_with(changed, use_cache=False)
    assert cached == fresh


@pytest.mark.parametrize(
    "method", [method.name for method in KEYED_METHODS if "seed" in method.parameters.model_fields]
)
def test_a_seeded_mask_differs_between_keys_of_one_shape_and_repeats_per_key(method):
    generator = torch.Generator().manual_seed(0)
    base, first, second = (torch.randn(64, 48, generator=generator) for _ in range(3))
    function = get_method(method).function

    def merged(key: str) -> torch.Tensor:
        context = KeyContext(key, "unet", None, "sd1")
        return function(base, first, second, drop=0.5, seed=3, context=context, dtype=torch.float32)

    one = merged("model.diffusion_model.input_blocks.1.0.in_layers.2.weight")
    assert torch.equal(one, merged("model.diffusion_model.input_blocks.1.0.in_layers.2.weight"))
    other = merged("model.diffusion_model.input_blocks.2.0.in_layers.2.weight")
    assert not torch.equal(one, other), "the same inputs at another key got the same mask"


# --- usage errors -------------------------------------------------------------------


@pytest.fixture
def small_recipe(tmp_path, small_models):
    models = small_models
    return write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["finetune"]}, B: {models["other"]}}}
        nodes: {{out: "weighted_sum(A, B, alpha=0.5)"}}
        outputs: {{out: out.safetensors}}
        """,
    )


@contextlib.contextmanager
def server(answer: bool):
    """A TCP server on 127.0.0.1 that is no Dask scheduler: it accepts and stays
    silent, or answers every connection as a web server would."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            if answer:
                self.request.recv(65536)
                self.request.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            else:
                while self.request.recv(65536):  # silent until the client gives up
                    pass

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler) as listening:
        listening.daemon_threads = True
        thread = threading.Thread(target=listening.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"tcp://127.0.0.1:{listening.server_address[1]}"
        finally:
            listening.shutdown()


@pytest.mark.parametrize(
    ("answer", "message"),
    [(False, "no Dask scheduler answered within 2 s"), (True, "not as a Dask scheduler")],
    ids=["silent", "web-server"],
)
def test_a_scheduler_address_where_no_dask_scheduler_answers_is_refused(
    tmp_path, small_recipe, answer, message, monkeypatch
):
    # The wait is 10 s in use; its rule is the same at 2 s.
    monkeypatch.setattr("sdrecipe.engine.cluster.CONNECT_SECONDS", 2)
    with server(answer) as address:
        result = run_in_process("build", "--scheduler", address, str(small_recipe))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(
    ("scheduler", "message"),
    [
        ("foo", "give a Dask scheduler's address"),
        ("http://head:8786", "give a Dask scheduler's address"),
        ("tcp://head:99999", "give a Dask scheduler's address"),
        ("local:²", "local:N takes a number of workers"),
    ],
)
def test_a_scheduler_that_is_no_address_is_a_usage_error(small_recipe, scheduler, message):
    result = run_in_process("build", "--scheduler", scheduler, str(small_recipe))
    assert result.returncode == 2
    assert message in result.stderr and "internal error" not in result.stderr


@pytest.mark.parametrize("stdin", ["devnull", "closed"])
def test_init_without_a_terminal_asks_for_its_flags(tmp_path, stdin):
    redirect = "</dev/null" if stdin == "devnull" else "<&-"
    result = subprocess.run(
        ["sh", "-c", f'exec "$0" -m sdrecipe init --template weighted {redirect}', sys.executable],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert "missing --base" in result.stderr and "Traceback" not in result.stderr
    assert "internal error" not in result.stderr


def test_an_init_error_does_not_cite_the_recipe_it_removed(tmp_path, models):
    recipe = tmp_path / "blocks.yaml"
    result = run_in_process(
        "init",
        "--template", "block",
        "--base", str(models["base"]),
        "--other", str(models["finetune"]),
        "--blocks", "1,2,3",
        "--out", str(recipe),
    )  # fmt: skip
    assert result.returncode == 2
    assert "got 3" in result.stderr and f"{recipe}:" not in result.stderr
    assert f"{recipe} was not kept" in result.stderr
    assert not recipe.exists()


@pytest.mark.parametrize(
    "arguments",
    [
        ("build", "-j", "0", "recipe.yaml"),
        ("extract", "tuned.safetensors", "base.safetensors", "-o", "x.safetensors", "--rank", "0"),
        ("inspect", "missing.safetensors"),
        ("no-such-command",),
    ],
    ids=["threads", "rank", "missing-file", "command"],
)
def test_a_usage_error_under_json_prints_the_error_object(arguments):
    result = run_in_process(*arguments, "--json")
    assert result.returncode == 2
    error = json.loads(result.stdout)
    assert error["kind"] == "usage" and error["exit_code"] == 2
    assert error["error"] and error["error"] in result.stderr
    assert run_in_process(*arguments).stdout == "", "without --json, stdout stays empty"


# --- --scheduler bounds (CLI audit, item 1)


@pytest.mark.parametrize(
    ("scheduler", "message"),
    [
        ("local:100000", "local:N starts N worker processes on this machine, at most"),
        ("", "--scheduler is empty"),
        ("   ", "--scheduler is empty"),
    ],
    ids=["too-many-workers", "empty", "blank"],
)
def test_an_unbounded_or_empty_scheduler_is_a_usage_error(
    tmp_path, small_recipe, scheduler, message
):
    """local:N above 4 workers a core would take minutes to start (or exhaust the
    machine), and an empty --scheduler is a mistake, not a request to build here."""
    result = run_in_process("build", "--scheduler", scheduler, str(small_recipe))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "internal error" not in result.stderr
    assert not (tmp_path / "out.safetensors").exists()
    result = run_in_process("build", "--json", "--scheduler", scheduler, str(small_recipe))
    assert result.returncode == 2 and message in json.loads(result.stdout)["error"]


def test_local_n_is_bounded_by_the_cores(monkeypatch):
    from sdrecipe.engine import cluster
    from sdrecipe.errors import RecipeError

    monkeypatch.setattr(cluster.os, "cpu_count", lambda: 3)
    cluster.check_scheduler("local:12")
    with pytest.raises(RecipeError, match="at most 12 here"):
        cluster.check_scheduler("local:13")


def test_a_scheduler_port_that_refuses_says_so_at_once(tmp_path, small_recipe):
    import socket

    with socket.socket() as probe:  # a port nothing listens on: bound, never listening
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
        started = time.monotonic()
        result = run_in_process("build", "--scheduler", address, str(small_recipe))
    assert result.returncode == 2, result.stderr
    assert "the connection was refused" in result.stderr, result.stderr
    assert "accepted the connection" not in result.stderr
    assert time.monotonic() - started < 5
    assert not (tmp_path / "out.safetensors").exists()


# --- cache clear / gc at a folder that is no cache (CLI audit, item 7)


@pytest.mark.parametrize("command", ["clear", "gc"])
def test_cache_clear_and_gc_leave_a_folder_that_is_no_cache_alone(tmp_path, command):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine")
    result = run_in_process("cache", command, "--cache-dir", str(plain))
    assert "cleared" not in result.stdout + result.stderr
    assert "there is no cache" in (result.stdout + result.stderr).lower()
    assert sorted(p.name for p in plain.iterdir()) == ["notes.txt"]
    posing = tmp_path / "posing"
    posing.mkdir()
    (posing / "notes.txt").write_text("mine")
    (posing / "index.sqlite").write_bytes(b"")
    result = run_in_process("cache", command, "--cache-dir", str(posing))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "notes.txt" in result.stderr and "not sdrecipe's" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in posing.iterdir()) == ["index.sqlite", "notes.txt"]
    assert (posing / "notes.txt").read_text() == "mine"
