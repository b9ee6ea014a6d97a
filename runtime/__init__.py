"""The lean FAR runtime: numpy + one backend (ONNX Runtime or TensorRT). Never imports torch."""
