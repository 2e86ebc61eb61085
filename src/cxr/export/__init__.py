"""ONNX / TensorRT export with parity validation (installed as ``cxr.export``)."""
