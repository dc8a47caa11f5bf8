"""The Llama-style decoder shared by the trainer and the serving engine.

The shape (``LlamaConfig``, ``PRESETS``, ``preset``) is torch-free and imported at once;
``Llama`` itself (torch) is imported on first use, so the shape is importable where torch is
not installed (the operator).
"""

from typing import Any

from kubeforge_runtime.model.shape import PRESETS, LlamaConfig, preset

__all__ = ["PRESETS", "Llama", "LlamaConfig", "preset"]


def __getattr__(name: str) -> Any:
    if name == "Llama":
        from kubeforge_runtime.model.llama import Llama
        return Llama
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
