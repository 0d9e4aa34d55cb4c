"""Who may call the server. Every route but the open ones (health, the web page and its static
files, which hold no data) needs an API key when the server has any; with several keys each is a
user of its own. A request a browser may have been made to send is refused: one from a page of
another origin than the server's own (or an allowed one), and, on a loopback server, one under a
Host name it does not answer to (a DNS-rebinding page). The same middleware counts every request
for `/metrics`.
"""

from __future__ import annotations

import hmac

from promethean.errors import PrometheanError
from promethean.serve.protocol import ApiError
from promethean.serve.telemetry import Metrics

# The names a loopback-bound server answers to by default.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class Access:
    """The API keys and the browser rules of a server (see AuthoriseAndCount.browser_refusal):
    `allowed_origins` whose pages may call it, and with `allowed_hosts`, the only Host names it
    answers to."""

    def __init__(self, api_key: str | list[str] | None, allowed_origins: tuple[str, ...] = (),
                 allowed_hosts: tuple[str, ...] | None = None) -> None:
        # "Bearer KEY" header -> the key's name ("" when there is one key: one user).
        keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
        if any(not key for key in keys):
            raise PrometheanError("an API key must not be empty.")
        self.api_keys: dict[bytes, str] = {
            f"Bearer {key}".encode(): "" if len(keys) == 1 else f"key{index + 1}"
            for index, key in enumerate(keys)}
        self.api_key = keys[0] if keys else None
        self.allowed_origins = frozenset(origin.rstrip("/") for origin in allowed_origins)
        self.allowed_hosts = (None if allowed_hosts is None
                              else frozenset(name.lower() for name in allowed_hosts))


KNOWN_ROUTES = {"/", "/health", "/metrics", "/chat", "/v1/models", "/v1/completions",
                "/v1/chat/completions"}


def _is_open(path: str) -> bool:
    """Routes that need no API key: health, and the web page with its static files (they hold
    no data; the API calls the page makes carry the key)."""
    return path in ("/", "/health") or path.startswith("/static/")


class AuthoriseAndCount:
    """ASGI middleware: the API key check (every route but the open ones) and request counting.
    Plain ASGI rather than `@app.middleware`, which would hide a client's disconnect from the
    routes."""

    def __init__(self, app, access: Access, metrics: Metrics) -> None:
        self.app = app
        self.access, self.metrics = access, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = (path if path in KNOWN_ROUTES
                 else "/static" if path.startswith("/static/") else "other")
        refusal = self.browser_refusal(scope)
        if refusal is not None:
            self.metrics.record_request(route, refusal.status)
            await refusal.response()(scope, receive, send)
            return
        keys = self.access.api_keys
        if keys and not _is_open(path):
            given = dict(scope["headers"]).get(b"authorization", b"")
            # Every key compared, in constant time each: which one matched says nothing by timing.
            matches = [name for header, name in keys.items() if hmac.compare_digest(given, header)]
            if matches:
                scope.setdefault("state", {})["key_name"] = matches[0]
            else:
                response = ApiError(401, "a valid API key is required: send the header "
                                    "'Authorization: Bearer KEY'.",
                                    error_type="authentication_error", code="invalid_api_key",
                                    headers={"WWW-Authenticate": "Bearer"})
                self.metrics.record_request(route, 401)
                await response.response()(scope, receive, send)
                return
        status = 500

        async def send_and_note_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            self.metrics.record_request(route, status)

    def browser_refusal(self, scope) -> ApiError | None:
        """A request a browser may have been made to send: from a page of another origin (any
        site can POST a form or a text/plain body here, no CORS preflight asked), or, on a
        loopback server, under a Host name it does not answer to (a DNS-rebinding page)."""
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        allowed_hosts = self.access.allowed_hosts
        if allowed_hosts is not None and _host_name(host).lower() not in allowed_hosts:
            return ApiError(403, f"this server does not answer to the Host '{host}'; start it "
                            "with --allow-host NAME to allow a name.",
                            error_type="permission_error", code="host_not_allowed")
        origin = headers.get(b"origin")
        if origin is None:  # not sent by a browser page (curl, the openai client, ...)
            return None
        origin_text = origin.decode("latin-1")
        own = f"{scope.get('scheme', 'http')}://{host}"
        if origin_text != own and origin_text not in self.access.allowed_origins:
            return ApiError(403, f"a page from {origin_text} may not call this server: only its "
                            "own page, or an origin given with --allow-origin.",
                            error_type="permission_error", code="origin_not_allowed")
        return None


def _host_name(host: str) -> str:
    """The name of a Host header without its port ('[::1]:8000' -> '::1')."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host
