"""The small CNN that judges generated shapes: shape, shape colour and background colour heads.

Its 256-d pooled features are what the evaluation's Frechet distance is computed on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from training.shapes_data import COLOUR_NAMES, SHAPES

WEIGHTS = Path(__file__).parent / "shapes_classifier.safetensors"


class ShapesClassifier(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers = []
        for cin, cout in zip(chans, chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.SiLU()]
        self.body = nn.Sequential(*layers)  # 64 -> 4 pixels
        dim = 2 * chans[-1]
        self.heads = nn.ModuleDict({
            "shape": nn.Linear(dim, len(SHAPES)),
            "colour": nn.Linear(dim, len(COLOUR_NAMES)),
            "background": nn.Linear(dim, len(COLOUR_NAMES)),
        })
        self.width = width

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 8*width) features of images (B, 3, 64, 64) in [-1, 1]: mean and max over the 4x4 map."""
        fmap = self.body(images)
        return torch.cat([fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))], dim=1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        return {name: head(feats) for name, head in self.heads.items()}


def save(model: ShapesClassifier, path: Path = WEIGHTS) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"config": json.dumps({"width": model.width})})


def load(path: Path = WEIGHTS) -> ShapesClassifier:
    """The trained classifier (eval mode) from its safetensors file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as fh:
        config = json.loads(fh.metadata()["config"])
    model = ShapesClassifier(**config)
    model.load_state_dict(load_file(str(path)))
    return model.eval()
