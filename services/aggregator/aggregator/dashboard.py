"""The operators' dashboard: static pages served by the aggregator, every asset local.

The pages hold no data and no credential: the browser logs in by exchanging an API token for an
8-hour session token (``POST /v1/sessions``), keeps it in ``sessionStorage`` and calls the same
REST routes as the CLI with it, so viewers read and admins act exactly as their role allows. The
charting library (uPlot, MIT) is vendored in this package under ``dashboard_static/vendor/`` with
its version and licence beside it, never fetched from a CDN, and a strict Content-Security-Policy
allows scripts, styles and images from this origin only (no inline script or style attribute).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

from fedhe.errors import NotFound
from fedhe.openapi import ERRORS

STATIC = Path(__file__).parent / "dashboard_static"
_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
# Every script, style sheet and icon shipped in the static folder, by its path there: nothing else
# is served (no directory listing, no path outside it, no licence or README as a page).
ASSETS = {
    path.relative_to(STATIC).as_posix(): path
    for path in sorted(STATIC.rglob("*"))
    if path.is_file() and path.suffix in _TYPES
}

SECURITY_HEADERS = {
    # uPlot draws on canvas and sizes its elements through the CSSOM, which style-src does not
    # govern: no inline style or script is needed.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # The CSP's frame-ancestors says the same to browsers that predate it.
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["dashboard"], responses={404: ERRORS[404], 429: ERRORS[429]})


@router.get("/dashboard", response_class=HTMLResponse)
def dashboard_page() -> FileResponse:
    """The dashboard (one page; it logs in and reads the REST routes with the operator's session)."""
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=SECURITY_HEADERS)


@router.get("/dashboard/assets/{name:path}", response_class=FileResponse)
def dashboard_asset(name: str) -> FileResponse:
    """A script, style sheet or icon of the dashboard (the vendored chart library's under ``vendor/``)."""
    path = ASSETS.get(name)
    if path is None:
        raise NotFound("no such dashboard asset")
    return FileResponse(path, media_type=_TYPES[path.suffix], headers=SECURITY_HEADERS)
