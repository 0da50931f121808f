"""What keeps the web view local and its state changes deliberate: the session
token, the Host and Origin checks against DNS rebinding and cross-site
requests, and security headers. There is no CORS: no other origin may read."""

from __future__ import annotations

import contextlib
import hmac
import secrets
import socket
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

TOKEN_HEADER = "x-sdrecipe-token"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SAFE_METHODS = ("GET", "HEAD")
# Only the app's own scripts and styles; the page's SVG is inline markup.
POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def new_token() -> str:
    return secrets.token_urlsafe(24)


def same(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def cookie_name(port: int) -> str:
    """The token's cookie; cookies ignore ports, so each server names its own."""
    return f"sdrecipe_token_{port}"


def allowed_hosts(host: str, port: int) -> set[str]:
    """The Host header values the server answers: its own address and the
    loopback names, with the port; listening on every address (0.0.0.0, ::),
    also this machine's names and their addresses."""
    names = {*LOCAL_HOSTS, host}
    if host in ("0.0.0.0", "::"):
        names |= {socket.gethostname(), socket.getfqdn()}
        with contextlib.suppress(OSError):
            names |= {str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None)}
    return {f"[{name}]:{port}" if ":" in name else f"{name}:{port}" for name in names}


class Guard:
    """ASGI middleware: refuses a request whose Host is not the server's own
    (DNS rebinding) or whose Origin is another site; a state change (any method
    but GET and HEAD) needs the token in `X-Sdrecipe-Token` (the page's forms
    send it), and every page and API read needs it in the header, the cookie
    set by the first visit, or `?token=`. The static files are public."""

    def __init__(self, app: ASGIApp, token: str, hosts: Iterable[str], port: int):
        self.app = app
        self.token = token
        self.hosts = set(hosts)
        self.origins = {f"http://{host}" for host in self.hosts}
        self.cookie = cookie_name(port)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)

        async def secured(message: dict) -> None:
            if message["type"] == "http.response.start":
                extra = [
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"content-security-policy", POLICY.encode()),
                    (b"cache-control", b"no-store"),
                ]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        refusal = self.refusal(scope, headers)
        if refusal is not None:
            await PlainTextResponse(refusal, status_code=403)(scope, receive, secured)
            return
        await self.app(scope, receive, secured)

    def refusal(self, scope: Scope, headers: Headers) -> str | None:
        """Why the request is refused, or None."""
        if headers.get("host") not in self.hosts:
            return "refused: this server answers only to its own address (Host header)"
        origin = headers.get("origin")
        if origin is not None and origin not in self.origins:
            return "refused: requests from other sites are not accepted (Origin header)"
        path: str = scope["path"]
        if path.startswith("/static/"):
            return None
        if same(headers.get(TOKEN_HEADER), self.token):
            return None
        if scope["method"] not in SAFE_METHODS:
            return "refused: a change needs the session token (X-Sdrecipe-Token)"
        query = dict(
            part.split("=", 1) for part in scope["query_string"].decode().split("&") if "=" in part
        )
        if same(query.get("token"), self.token) or same(_cookie(headers, self.cookie), self.token):
            return None
        return "refused: open the address `sdrecipe serve` printed (it carries the session token)"


def _cookie(headers: Headers, name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None
