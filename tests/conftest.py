"""Shared fixtures. Each fixture module under tests/fixtures/ is owned by the part it serves."""

pytest_plugins: list[str] = ["tests.fixtures.cluster", "tests.fixtures.s3", "tests.fixtures.realpods"]
