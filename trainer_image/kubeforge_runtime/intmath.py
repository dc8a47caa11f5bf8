"""Integer arithmetic shared by the runtime."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """``a / b`` rounded up, exact for any size (``math.ceil(a / b)`` goes through a float).
    The name is vLLM's and Triton's, as is the use: blocks or panels needed to hold ``a`` items."""
    return -(-a // b)
