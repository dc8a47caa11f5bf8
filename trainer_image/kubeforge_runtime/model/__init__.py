"""The Llama-style decoder shared by the trainer and the serving engine."""

from kubeforge_runtime.model.llama import PRESETS, Llama, LlamaConfig, preset

__all__ = ["PRESETS", "Llama", "LlamaConfig", "preset"]
