"""far-export: FAR checkpoints -> static ONNX graphs -> validation -> TensorRT engines -> manifest."""

__version__ = "0.1.0"
