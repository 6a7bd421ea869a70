"""The web page of `sagrt serve`: one HTML file, its CSS and plain JavaScript, shipped in sagrt/serve/static and
served at `/` and `/static/...`. The page talks only to this service's own API (/v1/status, /v1/generate with
server-sent events, /v1/jobs/{id}/cancel, and /v1/page/parameters below); nothing is loaded from another site
and nothing is built.

`POST /v1/page/parameters` turns the "parameters" text of a PNG (AUTOMATIC1111's format, which sagrt writes
too; the page reads the chunk from a dropped file) back into the fields of /v1/generate, so a file remembers
how it was made and the page can make it again.
"""

from __future__ import annotations

import re
from pathlib import Path

from sagrt.serve.samplers import sampler_to_scheduler

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_INFOTEXT_CHARS = 20_000
# A1111's settings line: `Key: value, Key: "quoted, value", ...`
SETTING = re.compile(r'\s*([^:,]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
NEGATIVE = "Negative prompt:"


def add_page(app) -> None:
    """GET / answers the page; /static/ serves its files (no-cache, so an upgraded service is seen at once)."""
    from fastapi import Body
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    index = STATIC_DIR / "index.html"

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(index, media_type="text/html", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/page/parameters", tags=["page"])
    async def parameters(text: str = Body(..., embed=True, alias="parameters", max_length=MAX_INFOTEXT_CHARS)):
        """A PNG's "parameters" text (A1111's format) -> the fields of /v1/generate it names, and the settings
        that have no field here (`ignored`)."""
        return parse_infotext(text)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def parse_infotext(text: str) -> dict:
    """{"fields": {native field: value}, "ignored": [setting names]} of an A1111 "parameters" text: the prompt,
    then a line starting "Negative prompt:", then one line of settings starting "Steps:"."""
    lines = text.strip().replace("\r\n", "\n").split("\n")
    settings = settings_of(lines[-1])
    if settings:
        lines.pop()
    prompt, negative, target = [], [], None
    for line in lines:
        if line.startswith(NEGATIVE):
            target, line = negative, line[len(NEGATIVE):].lstrip()
        (target if target is not None else prompt).append(line)
    fields: dict = {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative).strip() or None}
    ignored = []
    for key, value in settings.items():
        try:
            converted = setting_fields(key, value, settings)
        except (ValueError, KeyError):
            converted = None
        if converted is None:
            ignored.append(key)
        else:
            fields.update(converted)
    return {"fields": fields, "ignored": ignored}


def settings_of(line: str) -> dict:
    """`Steps: 20, Sampler: DDIM, ...` -> {"Steps": "20", ...}; {} when the line is not a settings line."""
    if not line.startswith("Steps:"):
        return {}
    settings = {}
    for key, value in SETTING.findall(line):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        settings[key.strip()] = value
    return settings


def setting_fields(key: str, value: str, settings: dict) -> dict | None:
    """One A1111 setting -> /v1/generate fields; None when it has no field here (Model, hires fix...)."""
    if key == "Steps":
        return {"num_inference_steps": int(value)}
    if key == "Sampler":
        scheduler, karras = sampler_to_scheduler(value, settings.get("Schedule type"))
        return {"scheduler": scheduler, "karras_sigmas": karras}
    if key == "Schedule type":
        return {}  # read with Sampler
    if key == "CFG scale":
        return {"guidance_scale": float(value)}
    if key == "Seed":
        return {"seed": int(value)}
    if key == "Size":
        width, height = value.lower().split("x")
        return {"width": int(width), "height": int(height)}
    if key == "SAG window":
        start, end = value.split(":")
        return {"sag_window": [float(start), float(end)]}
    numbers = {"SAG scale": ("sag_scale", float), "SAG threshold": ("sag_threshold", float),
               "SAG blur sigma": ("sag_blur_sigma", float), "SAG blur kernel": ("sag_blur_kernel", int)}
    if key in numbers:
        name, kind = numbers[key]
        return {name: kind(value)}
    return None
