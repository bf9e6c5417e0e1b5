"""graphkit: ONNX graph surgery for LoRA fine-tuned causal LMs, proven in Transformers.js."""
__version__ = "0.1.0"
