"""ONNX in and out, classifier location, graph passes and numeric parity checks."""
