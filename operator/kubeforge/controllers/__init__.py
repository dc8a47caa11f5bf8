"""The controllers, one package per kind (``trainingjob``, ``checkpointpolicy``,
``inferenceservice``), each in the same shape:

- ``plan.py``: spec + what was observed → the desired children and status; pure;
- ``manifests.py``: ``build_*`` functions returning the children as plain dicts; pure;
- ``handlers.py``: the kopf handlers: registration, reads and writes (through
  ``kubeforge.k8s``), the only place that looks at the settings (``memo.settings``).

Rule: nothing imports a ``handlers.py`` but ``kubeforge.main`` (importing one registers its
handlers), and a ``plan.py`` or ``manifests.py`` imports neither kopf nor the kubernetes
client. Shared by the kinds: ``workload`` (manifest pieces), ``status`` (conditions),
``pod_state`` (why pods cannot start), ``background`` (the operator's tasks).
tests/unit/test_operator_layout.py holds the rule.
"""
