"""Model export: torch -> ONNX (checked against torch) -> Triton model repository."""
