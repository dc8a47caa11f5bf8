"""Ceiling division, the block and panel counts of the server."""

from __future__ import annotations

import pytest
from kubeforge_runtime.intmath import cdiv

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("a", "b", "expected"), [
    (0, 16, 0), (1, 16, 1), (16, 16, 1), (17, 16, 2), (31, 16, 2), (32, 16, 2), (33, 16, 3),
    (150_000, 100_000, 2),  # a CPU quota of 1.5 cores is 2 threads
    (2**63 + 1, 2, 2**62 + 1),  # exact beyond a float's 53 bits
])
def test_cdiv_rounds_up(a: int, b: int, expected: int) -> None:
    assert cdiv(a, b) == expected
