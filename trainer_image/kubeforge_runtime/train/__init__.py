"""The training entry point (``python -m kubeforge_runtime.train``), loop, parallelism and schedule."""
