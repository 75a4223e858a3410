"""The operators' dashboard: static pages served by the aggregator, every asset local.

The pages hold no data and no credential: the browser logs in by exchanging an API token for an
8-hour session token (``POST /v1/sessions``), keeps it in ``sessionStorage`` and calls the same
REST routes as the CLI with it, so viewers read and admins act exactly as their role allows. The
charting library (plotly.js) is served from the locked Python package, never from a CDN, and a
strict Content-Security-Policy allows scripts from this origin only.
"""

from __future__ import annotations

import re
from pathlib import Path

import plotly
from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

from fedhe.errors import NotFound
from fedhe.openapi import ERRORS

STATIC = Path(__file__).parent / "dashboard_static"
PLOTLY = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
_ASSET = re.compile(r"^[a-z0-9-]+\.(js|css|svg)$")
_TYPES = {"js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}

SECURITY_HEADERS = {
    # Plotly sets inline style attributes on the elements it draws; scripts stay same-origin only.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
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


@router.get("/dashboard/assets/{name}", response_class=FileResponse)
def dashboard_asset(name: str) -> FileResponse:
    """A script, style sheet or icon of the dashboard, from this package (plotly.js from its own)."""
    match = _ASSET.fullmatch(name)
    path = PLOTLY if name == "plotly.min.js" else STATIC / name
    if name != "plotly.min.js" and (match is None or not path.is_file()):
        raise NotFound("no such dashboard asset")
    return FileResponse(path, media_type=_TYPES[name.rsplit(".", 1)[1]], headers=SECURITY_HEADERS)
