"""One I/O spec per exported network, read by export, engine build and buffer allocation.

Symbolic dimensions: B batch, H/W latent height/width, HM/WM the SAG layer's map, L text layers + 1.
A latent side s maps to ceil(s / 2**k) at a level k downsamplings deep (stride-2 convs, padding 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TEXT_TOKENS = 77
LATENT_CHANNELS = 4


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy name: float32, float16, int32
    shape: tuple  # ints and symbolic names


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's dynamic_axes: every symbolic dimension of every tensor."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in self.inputs + self.outputs if any(isinstance(d, str) for d in t.shape)}

    def to_table(self) -> dict:
        """The network's entry in a manifest: {"inputs": [[name, dtype, shape]], "outputs": [...]}."""
        return {"inputs": [[t.name, t.dtype, list(t.shape)] for t in self.inputs],
                "outputs": [[t.name, t.dtype, list(t.shape)] for t in self.outputs]}

    @classmethod
    def from_table(cls, name: str, table: dict) -> "NetworkSpec":
        """The NetworkSpec a manifest entry (to_table) describes."""
        def tensors(rows):
            return tuple(TensorSpec(n, d, tuple(shape)) for n, d, shape in rows)
        return cls(name, tensors(table["inputs"]), tensors(table["outputs"]))

    def shapes(self, dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
        """Concrete shape of every input and output for the given symbolic dimension values."""
        return {t.name: tuple(dims[d] if isinstance(d, str) else d for d in t.shape) for t in self.inputs + self.outputs}


def map_side(latent_side: int, downsamplings: int) -> int:
    """Side of the feature map `downsamplings` stride-2 convolutions below a latent side."""
    for _ in range(downsamplings):
        latent_side = math.ceil(latent_side / 2)
    return latent_side


def unet_spec(context_dim: int, dtype: str = "float32") -> NetworkSpec:
    return NetworkSpec(
        "unet",
        inputs=(TensorSpec("sample", dtype, ("B", LATENT_CHANNELS, "H", "W")),
                TensorSpec("timestep", "float32", (1,)),
                TensorSpec("encoder_hidden_states", dtype, ("B", TEXT_TOKENS, context_dim))),
        outputs=(TensorSpec("noise_pred", dtype, ("B", LATENT_CHANNELS, "H", "W")),
                 TensorSpec("attn_score", "float32", ("B", "HM", "WM"))),  # float32 also in fp16 graphs
    )


def text_encoder_spec(hidden_size: int, dtype: str = "float32") -> NetworkSpec:
    return NetworkSpec(
        "text_encoder",
        inputs=(TensorSpec("input_ids", "int32", ("B", TEXT_TOKENS)),),
        # layer_hidden[i] = final_layer_norm(hidden_states[i]): clip_skip k reads layer_hidden[-(k + 1)]
        outputs=(TensorSpec("hidden", dtype, ("B", TEXT_TOKENS, hidden_size)),
                 TensorSpec("layer_hidden", dtype, ("L", "B", TEXT_TOKENS, hidden_size))),
    )


def vae_decoder_spec(dtype: str = "float32") -> NetworkSpec:
    return NetworkSpec(
        "vae_decoder",
        inputs=(TensorSpec("latent", dtype, ("B", LATENT_CHANNELS, "H", "W")),),
        outputs=(TensorSpec("image", dtype, ("B", 3, "IH", "IW")),),
    )
