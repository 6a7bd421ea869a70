"""Will TensorRT's ONNX parser take this graph? A check of operators, attributes and opset against the
operator table of the TensorRT 10 ONNX parser (onnx-tensorrt docs/operators.md, TensorRT 10.x; read for
10.15), run on CPU without TensorRT installed.

The check is static: it knows the documented restrictions that depend on attributes and node structure, not
those that depend on tensor values at build time (e.g. "K must be less than 3840").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TENSORRT_TARGET = "10"
# TensorRT 10.0 parses opsets 9..20 (later 10.x releases raise the top); sagrt targets the whole 10.x line
OPSET_RANGE = (9, 20)

# operators the TensorRT 10 ONNX parser imports (default ONNX domain); everything else is refused
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization BlackmanWindow
Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv
DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression
NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign
RotaryEmbedding Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh
Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze STFT Sub Sum Tan Tanh TensorScatter
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# attribute values the parser accepts, where it accepts only some (attribute -> allowed values)
RESIZE_ALLOWED = {
    "coordinate_transformation_mode": {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric",
                                       "align_corners"},
    "mode": {"nearest", "linear"},
    "nearest_mode": {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"},
    "keep_aspect_ratio_policy": {"stretch"},
    "antialias": {0},
}
FIXED_ATTRIBUTES = {  # op -> {attribute: the only value supported}
    "LSTM": {"input_forget": 0, "layout": 0},
    "TopK": {"sorted": 1},
    "ScatterND": {"reduction": "none"},
}
POOLS_WITHOUT_DILATION = ("AveragePool", "MaxPool", "LpPool")
CONSTANT_UNSUPPORTED = ("sparse_value", "value_string", "value_strings")
SINGLE_OUTPUT_OPS = ("MaxPool", "LayerNormalization")  # Indices / Mean / InvStdDev outputs are unsupported


@dataclass(frozen=True)
class Finding:
    """One thing TensorRT's parser would refuse."""

    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op} node {self.node!r}: {self.reason}"


def _attributes(node) -> dict:
    import onnx

    return {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}


def _decoded(value):
    return value.decode() if isinstance(value, bytes) else value


def check_node(node) -> list[Finding]:
    """Findings for one node (not its subgraphs)."""
    name, op = node.name or "(unnamed)", node.op_type
    if node.domain not in ("", "ai.onnx"):
        return [Finding(name, op, f"operator of domain {node.domain!r}: TensorRT parses only the default ONNX "
                                  f"domain (custom ops need a plugin)")]
    if op not in SUPPORTED_OPS:
        return [Finding(name, op, f"operator not supported by the TensorRT {TENSORRT_TARGET} ONNX parser")]
    attrs = {key: _decoded(value) for key, value in _attributes(node).items()}
    findings = []
    if op == "Resize":
        for key, allowed in RESIZE_ALLOWED.items():
            if key in attrs and attrs[key] not in allowed:
                findings.append(Finding(name, op, f"{key}={attrs[key]!r} not supported (supported: "
                                                  f"{', '.join(sorted(map(str, allowed)))})"))
    for key, only in FIXED_ATTRIBUTES.get(op, {}).items():
        if key in attrs and attrs[key] != only:
            findings.append(Finding(name, op, f"{key}={attrs[key]!r} not supported (must be {only!r})"))
    if op in POOLS_WITHOUT_DILATION and any(d != 1 for d in attrs.get("dilations", [])):
        findings.append(Finding(name, op, f"dilations {attrs['dilations']} not supported (must be all ones)"))
    if op == "Constant":
        findings += [Finding(name, op, f"attribute {key} not supported") for key in CONSTANT_UNSUPPORTED
                     if key in attrs]
    if op in SINGLE_OUTPUT_OPS and any(output for output in node.output[1:]):
        findings.append(Finding(name, op, "only the first output is supported"))
    return findings


def _nodes(graph):
    """Every node of a graph, subgraphs (If/Loop/Scan bodies) included."""
    import onnx

    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _nodes(sub)


def tensorrt_findings(model) -> list[Finding]:
    """Findings for an ONNX model (a ModelProto or a path; weights are not loaded)."""
    import onnx

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model), load_external_data=False)
    findings = []
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)
    if opset is not None and not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        findings.append(Finding("(model)", "opset", f"opset {opset} outside the {OPSET_RANGE[0]}..{OPSET_RANGE[1]} "
                                                    f"range TensorRT {TENSORRT_TARGET} parses"))
    for node in _nodes(model.graph):
        findings += check_node(node)
    return findings


NORMALIZATIONS = ("LayerNormalization", "InstanceNormalization", "GroupNormalization")


def tensor_types(model) -> dict[str, int]:
    """ONNX element type of every named tensor of the main graph (after shape inference; weights not needed)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        types[value.name] = value.type.tensor_type.elem_type
    for node in graph.node:  # Constant nodes carry their type in the attribute
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def check_normalization_precision(model) -> list[Finding]:
    """Normalisation nodes whose input is not float32. TensorRT's ONNX parser (10.1) sets a LayerNormalization's
    compute precision from its stash_type (float32 by default): on float16 input that is an override a strongly
    typed network may refuse; on float32 input there is nothing to override. sagrt's fp16 exports keep every
    normalisation in float32, so this list is empty for them."""
    import onnx

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model), load_external_data=False)
    types = tensor_types(model)
    return [Finding(node.name or "(unnamed)", node.op_type,
                    f"input {node.input[0]!r} is {onnx.TensorProto.DataType.Name(types.get(node.input[0], 0))}, "
                    f"not FLOAT: export the normalisation in float32")
            for node in model.graph.node if node.op_type in NORMALIZATIONS
            and types.get(node.input[0]) != onnx.TensorProto.FLOAT]
