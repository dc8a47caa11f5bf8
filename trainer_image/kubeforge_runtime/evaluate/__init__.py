"""Offline evaluation of a flywheel candidate (issue 18): ``python -m kubeforge_runtime.evaluate``
is the pod; ``scoring.py`` holds the scores, ``kubeforge.store.evaluation`` the report format
and the gate the operator applies."""
