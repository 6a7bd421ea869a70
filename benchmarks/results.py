"""Measures and writes benchmarks/RESULTS.md: sagrt's onnxruntime backend against eager diffusers on this CPU.

    python benchmarks/results.py                       # measure all (about 8 min on 2 quiet cores), write RESULTS.md
    python benchmarks/results.py --only headline-tiny  # re-measure some runs (or the profile), keep the others' JSON
    python benchmarks/results.py --report-only         # rewrite RESULTS.md from benchmarks/results/*.json
    python benchmarks/results.py --smoke               # every run on tiny, 2 steps, into /tmp: checks the script

Every run is a `sagrt bench` (its command is printed with its table); raw numbers go to benchmarks/results/.
Run it on a quiet machine: the page records the load average at the start and end of every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from sagrt.export.artifacts import write_bytes_atomic, write_json_atomic
from sagrt.bench import BASELINE, BenchConfig, markdown, run_bench

HERE = Path(__file__).resolve().parent
PROFILE = "profile"  # the operator and loop profiles (benchmarks/profile_step.py), a run name for --only
BACKEND = "onnxruntime"
HEADLINE = dict(backends=(BACKEND,), steps=20, guidance_scale=7.5, sag_scale=0.75)
SWEEP = dict(backends=(BACKEND,), steps=4, guidance_scale=7.5, sag_scale=0.75, repeats=2, warmup=1, cfg_repeats=0)
# name -> what `sagrt bench` measures. small at 20 steps costs most: 3 repeats (not 5) keep the whole script
# within about 8 minutes on 2 cores; the sweeps time 4 steps, enough for a per-step cost.
RUNS = {
    "headline-tiny": BenchConfig(model="tiny", sizes=((64, 64), (128, 128)), repeats=15, warmup=1, **HEADLINE),
    "headline-small": BenchConfig(model="small", sizes=((256, 256),), repeats=3, warmup=1, cfg_repeats=2, **HEADLINE),
    "scaling-pixels": BenchConfig(model="small", sizes=((128, 128), (192, 192), (256, 256), (320, 320)), **SWEEP),
    **{f"scaling-batch{b}": BenchConfig(model="small", sizes=((128, 128),), batch=b, **SWEEP) for b in (1, 2, 4)},
}
TARGETS = (  # (what, run, size, key, comparison, target)
    ("onnxruntime end to end vs diffusers, tiny 64x64", "headline-tiny", (64, 64), "speedup_end_to_end", ">=", 4.0),
    ("onnxruntime end to end vs diffusers, small 256x256", "headline-small", (256, 256), "speedup_end_to_end", ">=",
     1.4),
    ("onnxruntime loop overhead (step - UNet) / step, small 256x256", "headline-small", (256, 256), "loop_overhead",
     "<", 0.03),
)


def smoke(config: BenchConfig) -> BenchConfig:
    """The same run on the tiny model, 2 steps, 1 repeat: exercises every path of this script in about a minute."""
    return dataclasses.replace(config, model="tiny", steps=2, repeats=1, warmup=0,
                               cfg_repeats=None if config.cfg_repeats is None else min(config.cfg_repeats, 1))


def measure(runs: dict[str, BenchConfig], out: Path, label: str | None) -> None:
    for name, config in runs.items():
        start = time.perf_counter()
        report = run_bench(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
        report["label"] = label
        report["wall_s"] = time.perf_counter() - start
        write_json_atomic(out / f"{name}.json", report)
        print(f"{name}: {report['wall_s']:.0f} s", file=sys.stderr, flush=True)


def row(report: dict, backend: str, size=None) -> dict:
    return next(r for r in report["results"] if r["backend"] == backend and (size is None or
                                                                          (r["height"], r["width"]) == tuple(size)))


def verdict(value: float, comparison: str, target: float) -> str:
    """'met', or by how much the target is missed."""
    if comparison == ">=":
        return "met" if value >= target else f"missed: {value / target:.0%} of the target ({target / value:.2f}x short)"
    if (value < target) if comparison == "<" else (value <= target):
        return "met"
    over = value / target
    return f"missed: {over:.1f}x the limit" if over >= 1.1 else f"missed: {over - 1:.1%} over the limit"


def targets_table(reports: dict) -> str:
    lines = ["| target | measured | needed | verdict |", "|---|---|---|---|"]
    for what, name, size, key, comparison, target in TARGETS:
        if name not in reports:
            lines.append(f"| {what} | not measured | {comparison} {target:g} | |")
            continue
        value = row(reports[name], BACKEND, size)[key]
        shown = (lambda v: f"{v:.2f}x") if key.startswith("speedup") else (lambda v: f"{v:.1%}")
        lines.append(f"| {what} | {shown(value)} | {comparison} {shown(target)} | "
                     f"{verdict(value, comparison, target)} |")
    for name in ("headline-tiny", "headline-small"):
        for r in (r for r in reports.get(name, {}).get("results", []) if r["backend"] == BACKEND):
            lines.append(f"| onnxruntime peak RSS vs diffusers, {reports[name]['config']['model']} "
                         f"{r['height']}x{r['width']} | {r['peak_rss_mb']:.0f} MB ({r['memory_ratio']:.2f}x) | "
                         f"<= 1.00x | {verdict(r['memory_ratio'], '<=', 1.0)} |")
    return "\n".join(lines)


def breakdown_runs(reports: dict) -> list[tuple[str, tuple]]:
    """(run, size) whose per-step breakdown the page shows: small's headline, and every headline whose end-to-end
    target is missed (the page must say what takes the time there)."""
    runs = [("headline-small", tuple(reports["headline-small"]["config"]["sizes"][0]))] \
        if "headline-small" in reports else []
    for _, name, size, key, comparison, target in TARGETS:
        if key == "speedup_end_to_end" and name in reports and (name, size) not in runs \
                and verdict(row(reports[name], BACKEND, size)[key], comparison, target) != "met":
            runs.insert(0, (name, size))
    return runs


def breakdown(report: dict, size) -> str:
    """Per step, where the time goes, from the bench's own stage timing (median runs)."""
    lines = ["| backend | step ms | UNet 2B ms | UNet B ms | rest of the loop ms | text ms | VAE ms |",
             "|---|---|---|---|---|---|---|"]
    for backend in (BASELINE, BACKEND):
        r = row(report, backend, size)
        rest = r["step_ms"] * r["loop_overhead"]
        lines.append(f"| {backend} | {r['step_ms']:.1f} | {r['unet_2b_ms']:.1f} | {r['unet_b_ms']:.1f} | {rest:.1f} | "
                     f"{r['text_ms']:.1f} | {r['vae_ms']:.1f} |")
    return "\n".join(lines)


def scaling_pixels(report: dict) -> str:
    lines = ["| size | latent pixels | diffusers step ms | onnxruntime step ms | onnxruntime us per latent pixel | "
             "speedup per step |", "|---|---|---|---|---|---|"]
    for r in (r for r in report["results"] if r["backend"] == BACKEND):
        base = row(report, BASELINE, (r["height"], r["width"]))
        lines.append(f"| {r['height']}x{r['width']} | {r['latent_pixels']} | {base['step_ms']:.1f} | "
                     f"{r['step_ms']:.1f} | {r['step_ms'] * 1e3 / r['latent_pixels']:.1f} | {r['speedup_step']:.2f}x |")
    return "\n".join(lines)


def scaling_batch(reports: list[dict]) -> str:
    lines = ["| batch | diffusers step ms | onnxruntime step ms | onnxruntime ms per image-step | speedup per step |",
             "|---|---|---|---|---|"]
    for report in reports:
        r, base = row(report, BACKEND), row(report, BASELINE)
        lines.append(f"| {r['batch']} | {base['step_ms']:.1f} | {r['step_ms']:.1f} | {r['step_ms'] / r['batch']:.1f} | "
                     f"{r['speedup_step']:.2f}x |")
    return "\n".join(lines)


def setup_lines(report: dict) -> str:
    env = report["environment"]
    return (f"`{report['command']}` — {env['date']}, {env['machine']} ({env['cores']} cores), load average "
            f"{env['load_average'][0]:.2f} at start / {env.get('load_average_end', [float('nan')])[0]:.2f} at end")


def page(reports: dict, profile_text: str | None) -> str:
    any_report = next(iter(reports.values()))
    env = any_report["environment"]
    labels = sorted({r.get("label") or "" for r in reports.values()} - {""})
    parts = ["# sagrt benchmark results (CPU)", "",
             f"Written by `python benchmarks/results.py`. Machine: {env['machine']}, {env['cores']} cores, no GPU. "
             f"Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".",
             ""]
    if labels:
        parts += ["**" + "; ".join(labels) + "**", ""]
    small, tiny = RUNS["headline-small"], RUNS["headline-tiny"]
    parts += ["Baseline: diffusers' `StableDiffusionSAGPipeline`, eager PyTorch, built from the same modules, same "
              "prompt, seed, DDIM scheduler, guidance 7.5 and sag_scale 0.75. Each backend is measured in its own "
              "process, the processes taking turns run by run (0.2 s apart), SAG and sag_scale=0 runs alternating; "
              "warm-up runs are excluded and every number is the median of the repeats in its command. "
              f"To keep the whole script near 8 minutes on 2 cores, small at 20 steps uses {small.repeats} repeats "
              f"and {small.cfg_repeats} sag_scale=0 runs (tiny: {tiny.repeats} each) and the sweeps time "
              f"{SWEEP['steps']} steps with {SWEEP['repeats']} repeats. SAG overhead: a SAG step over a sag_scale=0 "
              "(CFG-only) step. Loop overhead: (step - UNet calls) / step. Peak RSS: the process's high-water mark "
              "during the runs (reset after loading).", "",
              "## Targets", "", targets_table(reports), ""]
    for name, size in breakdown_runs(reports):
        report = reports[name]
        parts += [f"## Where the time goes: {report['config']['model']} {size[0]}x{size[1]}, per step", "",
                  breakdown(report, size), ""]
    if profile_text:
        parts += [profile_text, ""]
    parts += ["## onnxruntime vs eager diffusers", ""]
    for name in ("headline-tiny", "headline-small"):
        if name in reports:
            config = reports[name]["config"]
            parts += [markdown(reports[name], title=f"{config['model']}, {config['steps']} steps")
                      .replace("## ", "### "), ""]
    parts += ["## Scaling", ""]
    if "scaling-pixels" in reports:
        config = reports["scaling-pixels"]["config"]
        parts += [f"### Per-step cost vs latent pixels ({config['model']}, batch {config['batch']})", "",
                  setup_lines(reports["scaling-pixels"]),
                  "", scaling_pixels(reports["scaling-pixels"]), ""]
    batches = [reports[f"scaling-batch{b}"] for b in (1, 2, 4) if f"scaling-batch{b}" in reports]
    if batches:
        config = batches[0]["config"]
        parts += [f"### Per-step cost vs batch ({config['model']}, {config['sizes'][0][0]}x{config['sizes'][0][1]})",
                  ""]
        parts += [setup_lines(report) + "  " for report in batches]
        parts += ["", scaling_batch(batches), ""]
    return "\n".join(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help=f"comma-separated runs of {', '.join(RUNS)}, {PROFILE}")
    parser.add_argument("--report-only", action="store_true", help="write RESULTS.md from the JSON already there")
    parser.add_argument("--label", default=None, help="a note shown on the page, e.g. 'preliminary: load 2.1'")
    parser.add_argument("--out", default=None, help="folder of the JSON reports (default: benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="every run on tiny with 2 steps, written under "
                        "/tmp/sagrt-results-smoke (never over the committed results)")
    args = parser.parse_args()
    out = Path(args.out or ("/tmp/sagrt-results-smoke" if args.smoke else HERE / "results"))
    page_path = out / "RESULTS.md" if args.smoke else HERE / "RESULTS.md"
    names = [*RUNS, PROFILE] if args.only is None else [name.strip() for name in args.only.split(",")]
    unknown = [name for name in names if name not in RUNS and name != PROFILE]
    if unknown:
        parser.error(f"unknown run(s) {', '.join(unknown)}: choose from {', '.join(RUNS)}, {PROFILE}")
    import profile_step  # beside this script

    start = time.perf_counter()
    profile_path = out / "profile.json"
    if not args.report_only:
        runs = {name: smoke(RUNS[name]) if args.smoke else RUNS[name] for name in names if name != PROFILE}
        measure(runs, out, args.label or ("SMOKE TEST: tiny model, 2 steps; not a measurement" if args.smoke else None))
        if PROFILE in names:
            model, size = ("tiny", 64) if args.smoke else ("small", 256)
            collected = profile_step.collect(model, size, size)
            write_json_atomic(profile_path, collected)
    reports = {name: json.loads((out / f"{name}.json").read_text()) for name in RUNS if (out / f"{name}.json").exists()}
    if not reports:
        sys.exit(f"no reports in {out}/: run python benchmarks/results.py first")
    profile_text = profile_step.markdown(json.loads(profile_path.read_text())) if profile_path.exists() else None
    write_bytes_atomic(page_path, page(reports, profile_text).encode())
    print(f"wrote {page_path} ({time.perf_counter() - start:.0f} s, load average "
          f"{os.getloadavg()[0]:.2f})", file=sys.stderr)


if __name__ == "__main__":
    main()
