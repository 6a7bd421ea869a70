"""The attention signal SAG reads, captured from one self-attention layer of the UNet.

`attn_score[b, i, j]` is how much attention key position (i, j) of the layer's 2-D map
receives: the layer's attention probabilities [B, heads, T, T] averaged over heads and
summed over queries (mean 1.0). SAG masks the positions whose score exceeds a threshold
(Hong et al. 2023, eq. 25). The score is computed in float32 whatever the model's dtype.

The same capture serves the eager torch runner and the ONNX export, so both compute the
score with the same operations.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from sagrt.errors import SagrtError
from sagrt.locks import object_lock
from sagrt.networks import MID_BLOCK_LAYER


class SAGLayerError(SagrtError):
    """The requested SAG layer does not exist or is not a self-attention layer."""


class ScoreProcessor:
    """Attention processor that computes the layer's output like diffusers' explicit path and
    keeps the key-attention score. Only installed on the one layer SAG reads."""

    def __init__(self):
        self.score = None  # (B, T) float32

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch, tokens, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*heads, T, d)
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        if query.dtype == torch.float32:
            probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, T, T)
        else:  # fp16/bf16: softmax in float32, or the rounded probabilities move scores across SAG's threshold
            mask = None if attention_mask is None else attention_mask.float()
            probs = attn.get_attention_scores(query.float(), key.float(), mask)
        # mean over heads, sum over queries: attention received by each key position
        self.score = probs.float().reshape(batch, attn.heads, tokens, tokens).mean(1).sum(1)  # (B, T)
        out = attn.batch_to_head_dim(torch.bmm(probs.to(value.dtype), value))
        return attn.to_out[1](attn.to_out[0](out))


def resolve_layer(unet, layer: str = MID_BLOCK_LAYER):
    """Returns (attention module, the Transformer2DModel holding it) for a dotted layer path."""
    if ".transformer_blocks." not in layer or not layer.endswith(".attn1"):
        raise SAGLayerError(f"SAG layer {layer!r} is not a self-attention layer: use a path ending in "
                            f"'.transformer_blocks.N.attn1', e.g. {MID_BLOCK_LAYER!r}")
    try:
        attn = unet.get_submodule(layer)
        transformer = unet.get_submodule(layer.split(".transformer_blocks.")[0])
    except AttributeError as err:
        raise SAGLayerError(f"SAG layer {layer!r} does not exist in this UNet (default {MID_BLOCK_LAYER!r}; "
                            f"an up-block layer looks like 'up_blocks.1.attentions.0.transformer_blocks.0.attn1')"
                            ) from err
    return attn, transformer


class SAGCapture:
    """Filled during one UNet forward inside `capture_sag_score`."""

    def __init__(self):
        self.processor = ScoreProcessor()
        self.map_size = None

    def score_map(self) -> torch.Tensor:
        """(B, hm, wm) float32: the score laid out on the layer's 2-D map."""
        if self.processor.score is None or self.map_size is None:
            raise RuntimeError("no SAG score captured: the UNet forward did not reach the SAG layer")
        batch = self.processor.score.shape[0]
        return self.processor.score.reshape(batch, self.map_size[0], self.map_size[1])


@contextmanager
def capture_sag_score(unet, layer: str = MID_BLOCK_LAYER):
    """Installs the score processor on `layer` for the duration of the block, then restores the
    layer's own processor, also after an exception. Other layers keep their fast attention."""
    attn, transformer = resolve_layer(unet, layer)
    with object_lock(unet):  # the processor swap is the UNet's state: one capture at a time, others wait
        with _installed(attn, transformer) as capture:
            yield capture


@contextmanager
def _installed(attn, transformer):
    capture = SAGCapture()

    def record_map_size(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        capture.map_size = hidden.shape[-2:]

    original = attn.processor
    attn.set_processor(capture.processor)
    hook = transformer.register_forward_pre_hook(record_map_size, with_kwargs=True)
    try:
        yield capture
    finally:
        hook.remove()
        attn.set_processor(original)


class FusedAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v over `heads` heads, on the projections q [B, S, heads*d], k and v [B, L, heads*d].
    Eager it is torch's SDPA; exported (torch.onnx.export, dynamo=False) it is one com.microsoft
    MultiHeadAttention node, which ONNX Runtime's CPU and CUDA providers run fused. TensorRT's ONNX parser does
    not know that operator: only the ONNX Runtime copy of the UNet graph uses it."""

    @staticmethod
    def forward(ctx, query, key, value, heads: int, scale: float):
        split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731  [B, heads, S, d]
        out = F.scaled_dot_product_attention(split(query), split(key), split(value), scale=scale)
        return out.transpose(1, 2).flatten(2)

    @staticmethod
    def symbolic(g, query, key, value, heads: int, scale: float):
        out = g.op("com.microsoft::MultiHeadAttention", query, key, value, num_heads_i=heads, scale_f=scale)
        out.setType(query.type())
        return out


def is_plain_attention(attn) -> bool:
    """A diffusers Attention layer that is projections, softmax attention and output projection only (every
    attention layer of the SD 1.x/2.x UNet): no norms, residual or rescaling for FusedAttention to miss."""
    return (attn.group_norm is None and attn.spatial_norm is None and attn.norm_cross is None
            and getattr(attn, "norm_q", None) is None and getattr(attn, "norm_k", None) is None
            and not attn.residual_connection and attn.rescale_output_factor == 1.0)


class FusedAttentionProcessor:
    """Runs a plain attention layer through FusedAttention."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError("FusedAttentionProcessor takes 3-D hidden states without an attention mask")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        out = FusedAttention.apply(attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context), attn.heads,
                                   float(attn.scale))
        return attn.to_out[1](attn.to_out[0](out))


@contextmanager
def fused_attention(unet):
    """Every plain attention layer of `unet` runs FusedAttentionProcessor inside the block; the layers' own
    processors come back afterwards, also after an exception. A SAG capture entered inside the block replaces
    its one layer's processor as usual."""
    original = unet.attn_processors
    layers = {name: unet.get_submodule(name.removesuffix(".processor")) for name in original}
    unet.set_attn_processor({name: FusedAttentionProcessor() if is_plain_attention(layer) else original[name]
                             for name, layer in layers.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(original)
