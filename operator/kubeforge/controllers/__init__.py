"""One module per kind: pure functions (spec + observed → desired children and status) and
the thin kopf handlers that call them. Importing this package registers the handlers."""

from kubeforge.controllers import checkpointpolicy, inferenceservice, trainingjob

__all__ = ["checkpointpolicy", "inferenceservice", "trainingjob"]
