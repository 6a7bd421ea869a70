"""Images out: PNG bytes carrying their parameters in a text chunk, written as AUTOMATIC1111 writes them."""

from __future__ import annotations

import base64
import io

from sagrt.serve.schemas import GenerationParams


def infotext(params: GenerationParams, seed: int, model: str, sampler: str) -> str:
    """A1111's "parameters" text: prompt, negative prompt, then `Key: value` pairs (A1111 and its readers
    parse it back), plus sagrt's SAG controls."""
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    pairs = {"Steps": params.steps, "Sampler": sampler, "CFG scale": params.guidance_scale, "Seed": seed,
             "Size": f"{params.width}x{params.height}", "Model": model, "SAG scale": params.sag_scale}
    if params.sag_scale > 0:
        pairs.update({"SAG threshold": params.sag_threshold, "SAG blur sigma": params.sag_blur_sigma,
                      "SAG blur kernel": params.sag_blur_kernel,
                      "SAG window": f"{params.sag_window[0]}:{params.sag_window[1]}"})
    lines.append(", ".join(f"{key}: {value}" for key, value in pairs.items()))
    return "\n".join(lines)


def png_bytes(image, parameters: str | None = None) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def png_b64(image, parameters: str | None = None) -> str:
    return base64.b64encode(png_bytes(image, parameters)).decode()
