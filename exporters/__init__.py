"""Exporters: map a tasa-edge bit plan onto real file formats (GGUF, ONNX)."""
