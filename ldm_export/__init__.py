"""Checkpoint dir -> engine dir: ONNX graphs, fp16 graphs, TensorRT plans, the manifest and `ldm-export`."""
