"""Builds started from the page: one at a time, each an `sdrecipe build`
process whose events (its `--events` file) are relayed as they are written,
kept as the history, and stopped like Ctrl-C when cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdrecipe.errors import RecipeError
from sdrecipe.io.atomic import write_text_atomically
from sdrecipe.serve.workspace import NotFound, Workspace

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
)
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
MAX_QUEUED = 20
POLL_SECONDS = 0.1
SUMMARY_SUFFIX = ".build.json"
EVENTS_SUFFIX = ".events.jsonl"
# On Linux, a build stops as Ctrl-C stops it when the server dies, even by kill -9
# (it would otherwise go on alone, holding the cache): before it becomes
# `sdrecipe build`, the process asks for SIGTERM when its parent dies.
ORPHAN_GUARD = """\
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(130)  # the server died before the request was made
os.execv(sys.argv[2], sys.argv[2:])
"""
BUILD_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")


@dataclass
class BuildRecord:
    """One build asked for from the page: what, its state, and what it said.
    `progress` is the latest progress event per recipe; `outputs` the outputs
    it finished; `errors` its recipes' errors (or the command's)."""

    id: str
    recipe: str | None
    outputs_asked: list[str]
    state: str = QUEUED
    queued_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    summary: dict[str, Any] | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """What the build builds, in words."""
        if self.recipe is None:
            return "the whole folder"
        return (
            f"{self.recipe} ({', '.join(self.outputs_asked)})"
            if self.outputs_asked
            else self.recipe
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "target": self.target}


class Broadcaster:
    """Fans messages out to every open event stream; a slow reader loses the
    oldest messages rather than holding the server up."""

    def __init__(self) -> None:
        self.subscribers: set[asyncio.Queue[tuple[str, dict[str, Any]]]] = set()

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        for queue in self.subscribers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait((kind, data))

    async def stream(
        self, greeting: Callable[[], list[tuple[str, dict[str, Any]]]]
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The `greeting` (the state now), then every message published after
        it: it is taken once subscribed, so that nothing falls in between."""
        queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(maxsize=1000)
        self.subscribers.add(queue)
        try:
            for message in greeting():
                yield message
            while True:
                yield await queue.get()
        finally:
            self.subscribers.discard(queue)


class Builds:
    """The queue of builds and their history (one summary and one events file
    per build in `history`), run one at a time through the CLI."""

    def __init__(
        self,
        workspace: Workspace,
        history: Path,
        publish: Callable[[str, dict[str, Any]], None],
        finished: Callable[[], None],
    ):
        self.workspace = workspace
        self.history = history
        self.publish = publish
        self.finished = finished
        self.records: dict[str, BuildRecord] = {}
        self.queue: asyncio.Queue[BuildRecord] = asyncio.Queue()
        self.process: asyncio.subprocess.Process | None = None
        self.running: BuildRecord | None = None
        self.stopping = False
        # The command line that runs a build; `sdrecipe build`'s arguments follow.
        self.cli = [sys.executable, "-m", "sdrecipe"]
        self._load_history()

    def _load_history(self) -> None:
        if not self.history.is_dir():
            return
        for path in sorted(self.history.glob(f"*{SUMMARY_SUFFIX}"))[-200:]:
            build_id = path.name.removesuffix(SUMMARY_SUFFIX)
            if not BUILD_ID.match(build_id):
                continue  # not a summary this server wrote
            try:
                data = json.loads(path.read_text())
                data.pop("target", None)
                record = BuildRecord(**{**data, "id": build_id})
                _check_types(record)
            except (OSError, ValueError, TypeError):
                continue
            if record.state not in FINISHED:
                record.state, record.errors = FAILED, ["the server stopped during this build"]
            self.records[record.id] = record

    def listing(self) -> list[BuildRecord]:
        """Every build, newest first."""
        return sorted(self.records.values(), key=lambda record: record.queued_at, reverse=True)

    def get(self, build_id: str) -> BuildRecord:
        try:
            return self.records[build_id]
        except KeyError:
            raise NotFound(f"no build {build_id!r}") from None

    def events_path(self, record: BuildRecord) -> Path:
        """The build's events file (JSON lines, as `sdrecipe build --events` writes)."""
        return self.history / f"{record.id}{EVENTS_SUFFIX}"

    def submit(self, recipe: str | None, outputs: list[str]) -> BuildRecord:
        """Queue a build of `recipe` (a file of the folder; None: the whole folder),
        or of its named outputs; checked now, so a mistake is answered at once."""
        snapshot = self.workspace.snapshot
        if recipe is not None:
            loaded = snapshot.recipe(recipe)
            unknown = [name for name in outputs if name not in loaded.outputs]
            origins = {spec.origin for spec in loaded.outputs.values() if spec.origin}
            unknown = [name for name in unknown if name not in origins]
            if unknown:
                raise RecipeError(
                    f"{recipe} has no output {unknown[0]!r} (it has: {', '.join(loaded.outputs)})"
                )
        elif outputs:
            raise RecipeError("name a recipe to build single outputs")
        waiting = sum(1 for record in self.records.values() if record.state == QUEUED)
        if waiting >= MAX_QUEUED:
            raise RecipeError(f"{waiting} builds are already waiting; cancel some first")
        build_id = time.strftime("%Y%m%d-%H%M%S-") + os.urandom(3).hex()
        record = BuildRecord(build_id, recipe, list(outputs))
        self.records[build_id] = record
        self.queue.put_nowait(record)
        self._changed(record)
        return record

    async def cancel(self, build_id: str) -> BuildRecord:
        """Take a queued build off the queue, or stop the running one as Ctrl-C
        does: the CLI finishes publishing what it has begun, and leaves no
        output half-written."""
        record = self.get(build_id)
        if record.state == QUEUED:
            record.state, record.finished_at = CANCELLED, time.time()
            self._save(record)
            self._changed(record)
        elif record.state == RUNNING and "cancelling" not in record.notes:
            # Once only: a second SIGTERM would interrupt the CLI's own cleanup.
            if self.process is not None:  # else `_run` signals it once it exists
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(signal.SIGTERM)
            record.notes.append("cancelling")
            self._changed(record)
        return record

    async def run_forever(self) -> None:
        """Run the queued builds one after another."""
        while True:
            record = await self.queue.get()
            if record.state != QUEUED or self.stopping:
                continue
            try:
                await self._run(record)
            finally:
                self.running = self.process = None
                self._save(record)
                self._changed(record)
                self.finished()

    async def stop(self) -> None:
        """Cancel the running build and wait for its process to end (the server
        is stopping); the queued ones are cancelled, and each is kept as such."""
        self.stopping = True
        for record in list(self.records.values()):
            if record.state == QUEUED:
                await self.cancel(record.id)
        if self.running is not None:
            await self.cancel(self.running.id)
        while self.running is not None and self.process is None:
            await asyncio.sleep(POLL_SECONDS)  # its process is starting: it is signalled then
        if self.process is not None:
            await self.process.wait()
        for _ in range(50):  # let `_run` record how the build ended before it is cancelled
            if self.running is None:
                break
            await asyncio.sleep(POLL_SECONDS)

    async def _run(self, record: BuildRecord) -> None:
        self.history.mkdir(parents=True, exist_ok=True)
        events_path = self.events_path(record)
        options = self.workspace.options
        folder = self.workspace.folder
        targets = [str(folder)] if record.recipe is None else [str(folder / record.recipe)]
        command = [*self.cli, "build", *targets, *record.outputs_asked]
        command += ["--events", str(events_path), "--cache-dir", str(options.cache_dir), "--json"]
        if options.threads:
            command += ["--threads", str(options.threads)]
        if options.device:
            command += ["--device", options.device]
        if options.device_memory:
            command += ["--device-memory", str(options.device_memory)]
        if record.recipe is None:
            command.append("--keep-going")
        if sys.platform.startswith("linux"):
            command = [sys.executable, "-c", ORPHAN_GUARD, str(os.getpid()), *command]
        record.state, record.started_at = RUNNING, time.time()
        self.running = record
        self._save(record)  # kept even if the server is killed (-9) before the build ends
        self._changed(record)
        self.process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # the server's terminal's Ctrl-C reaches it through `stop`
        )
        if "cancelling" in record.notes:  # cancelled while the process started
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
        output = asyncio.ensure_future(self.process.communicate())
        offset = 0
        while not output.done():
            await asyncio.sleep(POLL_SECONDS)
            offset = self._relay(record, events_path, offset)
        stdout, stderr = output.result()
        self._relay(record, events_path, offset)
        record.exit_code = self.process.returncode
        record.finished_at = time.time()
        with contextlib.suppress(ValueError):
            summary = json.loads(stdout.decode() or "null")
            if isinstance(summary, dict):  # keep the relayed build_finished event
                record.summary = {**summary, **(record.summary or {})}
        if record.exit_code == 0:
            record.state = SUCCEEDED
        elif record.exit_code == 130 or "cancelling" in record.notes:
            record.state = CANCELLED
        else:
            record.state = FAILED
        said = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
        errors = [line for line in said if line.startswith(("error:", "internal error:"))]
        if record.state == FAILED and not record.errors:
            record.errors = (
                errors or said[-1:] or [f"sdrecipe build exited with {record.exit_code}"]
            )

    def _relay(self, record: BuildRecord, events_path: Path, offset: int) -> int:
        """Publish the events written since `offset`; returns the new offset."""
        try:
            with open(events_path, "rb") as handle:
                handle.seek(offset)
                data = handle.read()
        except FileNotFoundError:
            return offset
        complete = data[: data.rfind(b"\n") + 1]
        for line in complete.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self._note(record, event)
            self.publish("build-event", {"build": record.id, "event": event})
        return offset + len(complete)

    def _note(self, record: BuildRecord, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "progress":
            record.progress[str(event.get("recipe"))] = event
        elif kind == "output_finished":
            record.outputs.append(event)
        elif kind == "recipe_finished" and not event.get("ok"):
            record.errors.append(f"{event.get('recipe')}: {event.get('error')}")
        elif kind in ("note", "warning"):
            record.notes.append(str(event.get("message", "")))
        elif kind == "build_finished":
            record.summary = {**(record.summary or {}), "finished": event}

    def _save(self, record: BuildRecord) -> None:
        self.history.mkdir(parents=True, exist_ok=True)
        path = self.history / f"{record.id}{SUMMARY_SUFFIX}"
        write_text_atomically(path, json.dumps(record.to_json(), default=str, indent=1))

    def _changed(self, record: BuildRecord) -> None:
        self.publish("build", record.to_json())


def _check_types(record: BuildRecord) -> None:
    """TypeError unless a record read back from disk has the types the pages use."""
    lists = (record.outputs_asked, record.outputs, record.errors, record.notes)
    if not all(isinstance(value, list) for value in lists) or not isinstance(record.progress, dict):
        raise TypeError("a malformed build summary")
    if not isinstance(record.state, str) or not isinstance(record.queued_at, (int, float)):
        raise TypeError("a malformed build summary")
    texts = (*record.outputs_asked, *record.errors, *record.notes)
    if not isinstance(record.recipe, (str, type(None))) or not all(
        isinstance(text, str) for text in texts
    ):
        raise TypeError("a malformed build summary")
    for output in record.outputs:  # the build page formats each size and digest
        if not isinstance(output, dict) or not isinstance(output.get("size", 0), int):
            raise TypeError("a malformed build summary")
        if not isinstance(output.get("digest", ""), str):
            raise TypeError("a malformed build summary")
    summary = {} if record.summary is None else record.summary
    finished = summary.get("finished", {}) if isinstance(summary, dict) else None
    if not isinstance(finished, dict) or not isinstance(finished.get("cache", {}), dict):
        raise TypeError("a malformed build summary")
    if not isinstance(finished.get("seconds", 0), (int, float)):
        raise TypeError("a malformed build summary")
    json.dumps(record.to_json(), allow_nan=False)  # ValueError for NaN, which the API cannot send
