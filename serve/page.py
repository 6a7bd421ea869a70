"""The web page of `sagrt serve`: one HTML file, its CSS and plain JavaScript, shipped in sagrt/serve/static and
served at `/` and `/static/...`. The page talks only to this service's own API (/v1/status, /v1/generate with
server-sent events, /v1/jobs/{id}/cancel); nothing is loaded from another site and nothing is built."""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"


def add_page(app) -> None:
    """GET / answers the page; /static/ serves its files (no-cache, so an upgraded service is seen at once)."""
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    index = STATIC_DIR / "index.html"

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(index, media_type="text/html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
