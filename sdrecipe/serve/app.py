"""The web view's Starlette app: pages (Jinja2, htmx), their partials, the JSON
API, and the event stream; every request is checked by `security.Guard`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from jinja2 import Environment, PackageLoader, select_autoescape
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from sdrecipe.engine.events import Event, Note
from sdrecipe.errors import RecipeError, SdrecipeError
from sdrecipe.serve import details, new_recipe
from sdrecipe.serve.builds import Broadcaster, Builds
from sdrecipe.serve.security import TOKEN_HEADER, Guard, allowed_hosts, cookie_name
from sdrecipe.serve.workspace import Forbidden, NotFound, Workspace

log = logging.getLogger("sdrecipe.serve")
STATIC = Path(__file__).parent / "static"
MAX_BODY = 1 << 20
FIRST_SNAPSHOT_WAIT = 5.0


class Server:
    """The state behind the app: the workspace and its snapshot, the builds,
    the event stream, and the watcher that reassesses when a file changes."""

    def __init__(self, workspace: Workspace, history: Path, token: str, interval: float = 1.0):
        self.workspace = workspace
        self.token = token
        self.interval = interval
        self.events = Broadcaster()
        self.builds = Builds(workspace, history, self.relay, self.build_finished)
        self.refresh = asyncio.Event()
        self.assessing = asyncio.Lock()
        self.last_error: str | None = None
        self.note: str | None = None  # what the assessment under way is waiting for
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, set by `lifespan`
        self.sweeps: dict[tuple[Any, ...], dict[str, Any]] = {}

    def relay(self, kind: str, data: dict[str, Any]) -> None:
        """Pass a build's message to the pages; an output it finished shows as
        up to date at once."""
        self.events.publish(kind, data)
        event = data.get("event", {}) if kind == "build-event" else {}
        if event.get("type") == "output_finished":
            path, output, result = Path(event["recipe"]), event["output"], event["result"]
            if self.workspace.mark_built(path, output, result):
                self.events.publish("recipes", {"version": self.workspace.snapshot.version})

    def heard(self, event: Event) -> None:
        """A note from an assessment (from a worker thread): shown on the page."""
        if isinstance(event, Note) and self.loop is not None:
            self.note = event.message
            self.loop.call_soon_threadsafe(self.events.publish, "recipes", {"note": event.message})

    def build_finished(self) -> None:
        self.refresh.set()

    async def reassess(self) -> None:
        """Take a new snapshot in a worker thread and tell the pages. Not while
        a build runs: it holds the cache lock, and its outputs are in flux."""
        if self.builds.running is not None:
            return
        async with self.assessing:
            try:
                snapshot = await run_in_threadpool(self.workspace.assess, self.heard)
                self.last_error = self.note = None
            except SdrecipeError as exc:
                self.last_error = str(exc)
                self.events.publish("recipes", {"version": -1, "error": self.last_error})
                return
            self.events.publish("recipes", {"version": snapshot.version})

    async def watch(self, first: asyncio.Future[None]) -> None:
        """After the `first` assessment, reassess whenever a recipe, lock, input
        or output changes (polled), or a build ends."""
        await first
        seen = await run_in_threadpool(self.workspace.watched)
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.refresh.wait(), self.interval)
            if self.builds.running is not None:
                await asyncio.sleep(self.interval)  # reassessed when the build ends
                continue
            now = await run_in_threadpool(self.workspace.watched)
            if now != seen or self.refresh.is_set():
                self.refresh.clear()
                await self.reassess()
                seen = await run_in_threadpool(self.workspace.watched)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.loop = asyncio.get_running_loop()
        # The first snapshot, waited for a while: not longer, as another process
        # may hold the cache (the page then says so, and fills in when it is done).
        first = asyncio.ensure_future(self.reassess())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(first), FIRST_SNAPSHOT_WAIT)
        tasks = [
            first,
            asyncio.ensure_future(self.watch(first)),
            asyncio.ensure_future(self.builds.run_forever()),
        ]
        try:
            yield
        finally:
            await self.builds.stop()
            for task in tasks:
                task.cancel()


def create_app(
    folder: Path,
    options: Any,
    token: str,
    host: str = "127.0.0.1",
    port: int = 8765,
    history: Path | None = None,
    interval: float = 1.0,
) -> Starlette:
    """The app serving `folder` (its recipes), building with `options`."""
    workspace = Workspace(folder, options)
    server = Server(
        workspace, history or workspace.folder / ".sdrecipe" / "builds", token, interval
    )
    pages = Environment(
        loader=PackageLoader("sdrecipe.serve", "templates"),
        autoescape=select_autoescape(["html"]),
    )
    cookie = cookie_name(port)

    def page(request: Request, name: str, **context: Any) -> HTMLResponse:
        html = pages.get_template(name).render(
            token=token,
            snapshot=workspace.snapshot,
            folder=workspace.folder,
            builds=server.builds,
            last_error=server.last_error,
            note=server.note,
            request=request,
            **context,
        )
        response = HTMLResponse(html)
        if request.query_params.get("token") == token:
            response.set_cookie(cookie, token, httponly=True, samesite="strict")
        return response

    def handles(route: Callable[[Request], Any]) -> Callable[[Request], Any]:
        """A route whose errors are one line: JSON for the API, text otherwise;
        unexpected ones are logged with their traceback, never shown."""

        async def answer(request: Request) -> Response:
            api_route = request.url.path.startswith("/api/")
            try:
                return await route(request)
            except SdrecipeError as exc:
                status = {Forbidden: 403, NotFound: 404}.get(type(exc), 400)
                message = str(exc)
            except Exception as exc:
                log.exception("%s %s failed", request.method, request.url.path)
                status, message = (
                    500,
                    f"internal error: {type(exc).__name__} (see the server's log)",
                )
            if api_route:
                return JSONResponse({"error": message}, status)
            return HTMLResponse(f'<p class="error">{_escape(message)}</p>', status)

        return answer

    def recipe_of(request: Request) -> Any:
        return workspace.snapshot.recipe(request.query_params.get("recipe", ""))

    async def payload(request: Request) -> dict[str, Any]:
        """The request's JSON object or form fields (URL-encoded, as htmx posts
        them); at most MAX_BODY bytes are read."""
        too_large = RecipeError(f"request too large (at most {MAX_BODY} bytes)")
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_BODY:
            raise too_large
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise too_large
        kind = request.headers.get("content-type", "")
        if kind.startswith("application/json"):
            try:
                data = json.loads(body or b"{}")
            except ValueError as exc:
                raise RecipeError(f"the request body is not JSON: {exc}") from None
            if not isinstance(data, dict):
                raise RecipeError("the request body must be a JSON object")
            return data
        if kind and not kind.startswith("application/x-www-form-urlencoded"):
            raise RecipeError("send JSON, or a URL-encoded form")
        fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return {key: values if key == "outputs" else values[-1] for key, values in fields.items()}

    # --- pages ---------------------------------------------------------------

    @handles
    async def index(request: Request) -> Response:
        return page(request, "index.html")

    @handles
    async def recipe_page(request: Request) -> Response:
        recipe = recipe_of(request)
        return page(request, "recipe.html", recipe=recipe, file=recipe.path.name)

    @handles
    async def folder_graph_page(request: Request) -> Response:
        return page(request, "folder_graph.html")

    @handles
    async def model_page(request: Request) -> Response:
        path = workspace.readable(request.query_params.get("path", ""))
        return page(request, "model.html", path=path, shown=request.query_params["path"])

    @handles
    async def diff_page(request: Request) -> Response:
        recipe = recipe_of(request)
        output = request.query_params.get("output", "")
        base = request.query_params.get("base") or details.base_of(recipe, output)
        return page(request, "diff.html", recipe=recipe, output=output, base=base)

    @handles
    async def sweep_page(request: Request) -> Response:
        recipe = recipe_of(request)
        table = details.sweep_table(recipe, False)
        return page(request, "sweep.html", recipe=recipe, table=table)

    @handles
    async def build_page(request: Request) -> Response:
        record = server.builds.get(request.path_params["build"])
        return page(request, "build.html", record=record)

    @handles
    async def new_page(request: Request) -> Response:
        return page(
            request,
            "new.html",
            templates=new_recipe.templates(),
            files=workspace.model_files(),
            dtypes=new_recipe.DTYPES,
        )

    # --- partials ------------------------------------------------------------

    @handles
    async def recipes_partial(request: Request) -> Response:
        return page(request, "_recipes.html", only=request.query_params.get("recipe"))

    @handles
    async def builds_partial(request: Request) -> Response:
        return page(request, "_builds.html")

    @handles
    async def graph_partial(request: Request) -> Response:
        return page(request, "_graph.html", svg=_graph_svg(workspace, request))

    @handles
    async def node_partial(request: Request) -> Response:
        detail = await run_in_threadpool(_node, workspace, request)
        return page(request, "_node.html", node=detail, file=detail["recipe"])

    @handles
    async def model_partial(request: Request) -> Response:
        report = await run_in_threadpool(_inspect, workspace, request)
        return page(request, "_model.html", report=report)

    @handles
    async def diff_partial(request: Request) -> Response:
        recipe = recipe_of(request)
        diff, data = await run_in_threadpool(_diff, recipe, request)
        from sdrecipe.views.model_diff import heatmap

        return page(request, "_diff.html", svg=heatmap(diff).to_svg(), data=data)

    @handles
    async def sweep_partial(request: Request) -> Response:
        table = await run_in_threadpool(_sweep, server, recipe_of(request))
        return page(request, "_sweep.html", table=table)

    @handles
    async def new_preview(request: Request) -> Response:
        answers = {key: str(value) for key, value in (await payload(request)).items()}
        draft = await run_in_threadpool(new_recipe.compose, workspace, answers)
        return page(
            request,
            "_draft.html",
            draft=draft,
            file=answers.get("file", ""),
            blocks=new_recipe.blocks(draft.family, answers.get("blocks", "")),
        )

    @handles
    async def new_check(request: Request) -> Response:
        answers = await payload(request)
        file, text = str(answers.get("file", "")), str(answers.get("text", ""))
        draft = new_recipe.Draft(text=text)
        try:
            path = new_recipe.recipe_path(workspace, file)
            await run_in_threadpool(new_recipe.check, workspace, path, draft)
        except RecipeError as exc:
            draft.errors.append(str(exc))
        return page(request, "_check.html", draft=draft)

    # --- JSON API ------------------------------------------------------------

    @handles
    async def api_recipes(request: Request) -> Response:
        return JSONResponse(workspace.snapshot.to_json())

    @handles
    async def api_graph(request: Request) -> Response:
        return JSONResponse(_graph(workspace, request).to_dict())

    @handles
    async def api_node(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(_node, workspace, request))

    @handles
    async def api_inspect(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(_inspect, workspace, request))

    @handles
    async def api_diff(request: Request) -> Response:
        recipe = recipe_of(request)
        return JSONResponse((await run_in_threadpool(_diff, recipe, request))[1])

    @handles
    async def api_sweep(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(_sweep, server, recipe_of(request)))

    @handles
    async def api_files(request: Request) -> Response:
        return JSONResponse({"files": workspace.model_files()})

    @handles
    async def api_templates(request: Request) -> Response:
        return JSONResponse(
            {
                "templates": new_recipe.templates(),
                "blocks": new_recipe.blocks(request.query_params.get("family")),
            }
        )

    @handles
    async def api_builds(request: Request) -> Response:
        return JSONResponse({"builds": [record.to_json() for record in server.builds.listing()]})

    @handles
    async def api_build_detail(request: Request) -> Response:
        return JSONResponse(server.builds.get(request.path_params["build"]).to_json())

    @handles
    async def api_build_events(request: Request) -> Response:
        record = server.builds.get(request.path_params["build"])
        path = server.builds.events_path(record)
        if not path.is_file():
            raise NotFound(f"build {record.id} has no events (it never started)")
        return Response(path.read_bytes(), media_type="application/x-ndjson")

    @handles
    async def api_build(request: Request) -> Response:
        data = await payload(request)
        recipe = data.get("recipe") or None
        outputs = data.get("outputs") or []
        if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
            raise RecipeError('"outputs" must be a list of output names')
        if recipe is not None and not isinstance(recipe, str):
            raise RecipeError('"recipe" must be the name of a recipe file in the folder')
        record = server.builds.submit(recipe, outputs)
        ahead = (
            sum(1 for r in server.builds.records.values() if r.state in ("queued", "running")) - 1
        )
        return JSONResponse({**record.to_json(), "ahead": ahead}, 202)

    @handles
    async def api_cancel(request: Request) -> Response:
        record = await server.builds.cancel(request.path_params["build"])
        return JSONResponse(record.to_json())

    @handles
    async def api_validate(request: Request) -> Response:
        data = await payload(request)
        draft = new_recipe.Draft(text=str(data.get("text", "")))
        path = new_recipe.recipe_path(workspace, str(data.get("file", "")))
        await run_in_threadpool(new_recipe.check, workspace, path, draft)
        return JSONResponse(
            {"valid": not draft.errors, "errors": draft.errors, "summary": draft.valid}
        )

    @handles
    async def api_new_recipe(request: Request) -> Response:
        data = await payload(request)
        path = await run_in_threadpool(
            new_recipe.save, workspace, str(data.get("file", "")), str(data.get("text", ""))
        )
        server.refresh.set()
        return JSONResponse({"written": path.name}, 201)

    async def api_events(request: Request) -> Response:
        def greeting() -> list[tuple[str, dict[str, Any]]]:
            messages = [("hello", {"version": workspace.snapshot.version})]
            running = server.builds.running
            if running is not None:  # a page opened (or reloaded) mid-build follows it at once
                messages.append(("build", running.to_json()))
                messages += [
                    ("build-event", {"build": running.id, "event": event})
                    for event in list(running.progress.values())
                ]
            return messages

        async def stream() -> AsyncIterator[dict[str, str]]:
            async for kind, data in server.events.stream(greeting):
                yield {"event": kind, "data": json.dumps(data, default=str)}

        return EventSourceResponse(stream(), ping=15)

    routes = [
        Route("/", index),
        Route("/recipe", recipe_page),
        Route("/graph", folder_graph_page),
        Route("/model", model_page),
        Route("/diff", diff_page),
        Route("/sweep", sweep_page),
        Route("/builds/{build}", build_page),
        Route("/new", new_page),
        Route("/partials/recipes", recipes_partial),
        Route("/partials/builds", builds_partial),
        Route("/partials/graph", graph_partial),
        Route("/partials/node", node_partial),
        Route("/partials/model", model_partial),
        Route("/partials/diff", diff_partial),
        Route("/partials/sweep", sweep_partial),
        Route("/partials/draft", new_preview, methods=["POST"]),
        Route("/partials/check", new_check, methods=["POST"]),
        Route("/api/recipes", api_recipes),
        Route("/api/recipes", api_new_recipe, methods=["POST"]),
        Route("/api/graph", api_graph),
        Route("/api/node", api_node),
        Route("/api/inspect", api_inspect),
        Route("/api/diff", api_diff),
        Route("/api/sweep", api_sweep),
        Route("/api/files", api_files),
        Route("/api/templates", api_templates),
        Route("/api/builds", api_builds),
        Route("/api/builds/{build}", api_build_detail),
        Route("/api/builds/{build}/events", api_build_events),
        Route("/api/builds/{build}/cancel", api_cancel, methods=["POST"]),
        Route("/api/build", api_build, methods=["POST"]),
        Route("/api/validate", api_validate, methods=["POST"]),
        Route("/api/events", api_events),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=server.lifespan)
    app.state.server = server
    return Guard(app, token, allowed_hosts(host, port), port)  # type: ignore[return-value]


def _graph(workspace: Workspace, request: Request) -> Any:
    from sdrecipe.views.recipe_graph import graph_of

    snapshot = workspace.snapshot
    if snapshot.recipe_set is None:
        raise RecipeError("the folder is not assessed yet")
    file = request.query_params.get("recipe")
    if not file:
        return graph_of(snapshot.recipe_set, [], snapshot.statuses)
    recipe = snapshot.recipe(file)
    from sdrecipe.plan.recipe_set import RecipeSet

    alone = RecipeSet((recipe,), {recipe.path: ()})
    return graph_of(alone, [], snapshot.statuses)


def _graph_svg(workspace: Workspace, request: Request) -> str:
    from sdrecipe.views.recipe_graph import to_scene

    svg = to_scene(_graph(workspace, request)).to_svg()
    return svg[svg.index("<svg") :]


def _node(workspace: Workspace, request: Request) -> dict[str, Any]:
    """A vertex's detail; in the folder's graph, vertices are `STEM/kind:name`."""
    file, vertex = request.query_params.get("recipe", ""), request.query_params.get("vertex", "")
    recipes = workspace.snapshot.recipe_set.recipes if workspace.snapshot.recipe_set else ()
    if not file and "/" in vertex:
        stem, _, vertex = vertex.partition("/")
        file = next((r.path.name for r in recipes if r.path.stem == stem), "")
    elif not file and len(recipes) == 1:  # a folder of one recipe: its graph, unprefixed
        file = recipes[0].path.name
    return {**details.node_detail(workspace.snapshot, file, vertex), "recipe": file}


def _inspect(workspace: Workspace, request: Request) -> dict[str, Any]:
    path = workspace.readable(request.query_params.get("path", ""))
    if not path.exists():
        raise NotFound(f"{request.query_params.get('path')} does not exist (not built yet?)")
    return details.inspect_file(path, workspace.options.cache_dir)


def _diff(recipe: Any, request: Request) -> tuple[Any, dict[str, Any]]:
    params = request.query_params
    outputs = [name for name in params.get("output", "").split(",") if name]
    return details.diff_against_base(recipe, outputs, params.get("base") or None)


def _sweep(server: Server, recipe: Any) -> dict[str, Any]:
    """The sweep table with distances, kept while the variants' files are unchanged."""
    key = (str(recipe.path), recipe.meaning, server.workspace.watched())
    if key not in server.sweeps:
        server.sweeps = {key: details.sweep_table(recipe, True)}
    return server.sweeps[key]


def _escape(text: str) -> str:
    from html import escape

    return escape(text)


__all__ = ["TOKEN_HEADER", "create_app"]
