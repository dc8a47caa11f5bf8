"""The serving engine every InferenceService pod runs: ``python -m kubeforge_runtime.serve``.

``engine`` (scheduler, paged KV cache, sampling) knows nothing of HTTP; ``api`` is the
OpenAI-compatible aiohttp front end; ``__main__`` wires them with the model loader.
"""
