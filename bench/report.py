"""The report as Markdown: the setup, the time table and the overhead / memory / parity table."""

from __future__ import annotations

from sagrt.bench.config import BASELINE


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


TIME_COLUMNS = ("size", "batch", "backend", "end-to-end s", "vs diffusers", "step ms", "UNet 2B ms", "UNet B ms",
                "text ms", "VAE ms")
COST_COLUMNS = ("size", "batch", "backend", "SAG overhead", "loop overhead", "peak RSS MB", "RSS vs diffusers",
                "latents rel. err", "PSNR dB")


def _table(columns, rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def time_table(results: list[dict]) -> str:
    return _table(TIME_COLUMNS, [
        (f"{r['height']}x{r['width']}", str(r["batch"]), r["backend"], _fmt(r["end_to_end_s"], ".3f"),
         _fmt(r["speedup_end_to_end"], ".2f", "x"), _fmt(r["step_ms"], ".1f"), _fmt(r["unet_2b_ms"], ".1f"),
         _fmt(r["unet_b_ms"], ".1f"), _fmt(r["text_ms"], ".1f"), _fmt(r["vae_ms"], ".1f")) for r in results])


def cost_table(results: list[dict]) -> str:
    def parity(r):
        if r["backend"] == BASELINE:
            return "-", "-"
        return _fmt(r["latents_relative_error"], ".2e"), ("identical" if r["images_identical"]
                                                          else _fmt(r["image_psnr_db"], ".1f"))

    return _table(COST_COLUMNS, [
        (f"{r['height']}x{r['width']}", str(r["batch"]), r["backend"], _fmt(r["sag_overhead"], ".2f", "x"),
         _fmt(r["loop_overhead"] * 100, ".1f", "%"), _fmt(r["peak_rss_mb"], ".0f"), _fmt(r["memory_ratio"], ".2f", "x"),
         *parity(r)) for r in results])


def describe_environment(report: dict) -> str:
    env = report["environment"]
    versions = ", ".join(f"{name} {v}" for name, v in env["versions"].items())
    load = " / ".join(f"{x:.2f}" for x in env["load_average"])
    lines = [f"- command: `{report['command']}`", f"- date: {env['date']}",
             f"- machine: {env['machine']}, {env['cores']} cores, torch threads {env['torch_threads']}"
             + (f", GPU {env['gpu']}" if "gpu" in env else ""),
             f"- load average at start (1/5/15 min): {load}", f"- versions: {versions}"]
    return "\n".join(lines)


def markdown(report: dict, title: str = "sagrt bench") -> str:
    """The whole report as Markdown: setup, then the time table and the overhead/memory/parity table."""
    return (f"## {title}\n\n{describe_environment(report)}\n\n{time_table(report['results'])}\n\n"
            f"{cost_table(report['results'])}\n")
