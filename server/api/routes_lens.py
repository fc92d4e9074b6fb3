"""The memory lens: a static page (`server/lens/`) served at `/lens`, and `/` as a page of links to it.

The files ship in the package and are read once, at import: no build step, nothing fetched from anywhere
else, so the page works on an air-gapped node. The page uses only the public API. Its Content-Security-
Policy allows scripts, styles and requests from this origin only and no inline script.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

from server.errors import NotFoundError

router = APIRouter()

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
}
_ASSETS = {
    entry.name: entry.read_bytes()
    for entry in files("server").joinpath("lens").iterdir()
    if entry.is_file() and any(entry.name.endswith(ext) for ext in _TYPES)
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated each time: a new server version serves its own page
}


def _file(name: str) -> Response:
    body = _ASSETS.get(name)
    if body is None:
        raise NotFoundError("no such file", code="not_found")
    media_type = _TYPES[name[name.rindex(".") :]]
    return Response(body, media_type=media_type, headers=_HEADERS)


@router.get("/", include_in_schema=False)
async def home() -> Response:
    """A page of links (the lens, the schema, health and metrics)."""
    return _file("home.html")


@router.get("/lens", include_in_schema=False)
async def lens() -> Response:
    """The memory lens page. It asks for the API key in the page when the server has one."""
    return _file("index.html")


@router.get("/lens/{name}", include_in_schema=False)
async def lens_asset(name: str) -> Response:
    """The page's scripts and style sheet (only the files shipped in server/lens/)."""
    return _file(name)
