"""Names every stage agrees on: the exported networks, the precisions and their dtypes, the SAG layer.

export/, engine/ and runtime/ all import these from here (never from one another), so a name has one home.
"""

from __future__ import annotations

import torch

from sagrt.errors import SagrtError

# The three networks of the runner contract (docs/design.md), in the order the loop calls them.
NETWORKS = ("text_encoder", "unet", "vae_decoder")

# Precision names as users write them -> the torch dtype they compute in. Each stage says which it takes:
# an export is fp32 or fp16, a TensorRT engine fp16 or fp32, OpenVINO fp32 or bf16, the torch reference any.
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Element type names as I/O specs and manifests write them (numpy's names) -> torch dtypes.
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int32": torch.int32, "int64": torch.int64}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}

# The self-attention layer diffusers' SAG pipeline reads (its score leaves every exported UNet as `attn_score`).
MID_BLOCK_LAYER = "mid_block.attentions.0.transformer_blocks.0.attn1"


def precision_name(dtype: torch.dtype) -> str:
    """'fp32', 'fp16' or 'bf16' for a torch dtype."""
    for name, known in PRECISIONS.items():
        if known == dtype:
            return name
    raise SagrtError(f"sagrt computes in {', '.join(map(str, PRECISIONS.values()))}, not {dtype}")
