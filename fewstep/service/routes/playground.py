"""`GET /` and `GET /static/{name}`: the playground page (`service/static/`), when `playground` is on.

Plain files from the package, no build step. The page is public (it holds no data); the API calls it
makes carry the key the person enters. The Content-Security-Policy keeps everything on this origin:
scripts, styles, connections (fetch and the video WebSocket), images (the API's base64 PNGs as
`data:` URLs) and media (a video's MP4, fetched with the key and played from a `blob:` URL); nothing is fetched
from outside.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

from fewstep.errors import NotFound
from fewstep.service.state import GatewayDep

router = APIRouter(include_in_schema=False)

FILES = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
"""Everything under `/static/` (a fixed list: no path from the request reaches the file system)."""

HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    """A page file's bytes, read once per process (they are part of the installed package)."""
    return files("fewstep.service").joinpath("static", name).read_bytes()


def _enabled(gw: GatewayDep) -> None:
    if not gw.settings.playground:
        raise NotFound("the playground page is off (`FEWSTEP_PLAYGROUND` = false)")


@router.api_route("/", methods=["GET", "HEAD"])
async def page(gw: GatewayDep) -> Response:
    _enabled(gw)
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.api_route("/static/{name}", methods=["GET", "HEAD"])
async def asset(name: str, gw: GatewayDep) -> Response:
    _enabled(gw)
    if name not in FILES:
        raise NotFound(f"no static file {name!r}")
    return Response(_read(name), media_type=FILES[name], headers=HEADERS)
