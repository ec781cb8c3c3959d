"""tasa-edge: Task-Aware Sensitivity Analysis for mixed-precision edge LLM quantization."""

__version__ = "0.1.0"
