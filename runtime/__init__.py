"""The SAG loop over any backend: pipeline, guidance math, scheduler glue, runners, CLI."""

from sagrt.runtime.pipeline import SAGConfig, SAGOutput, SAGPipeline

StableDiffusionSAGPipeline = SAGPipeline  # drop-in name for diffusers users

__all__ = ["SAGConfig", "SAGOutput", "SAGPipeline", "StableDiffusionSAGPipeline"]
