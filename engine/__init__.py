"""ONNX -> engines (TensorRT build) and the engine runners (TensorRT, ONNX Runtime)."""
