"""TrainingJob controller: first version — validates the spec and reports it in status."""

from __future__ import annotations

from typing import Any

import kopf

from kubeforge.api import TrainingJob, TrainingJobSpec
from kubeforge.api.common import GROUP, VERSION
from kubeforge.controllers.status import conditions_patch, parse_spec
from kubeforge.metrics import reconciling


@kopf.on.resume(GROUP, VERSION, TrainingJob.plural)
@kopf.on.create(GROUP, VERSION, TrainingJob.plural)
@kopf.on.update(GROUP, VERSION, TrainingJob.plural)
def reconcile(spec: Any, status: Any, meta: Any, patch: kopf.Patch, logger: Any, **_: Any) -> None:
    with reconciling(TrainingJob.kind):
        parsed, error = parse_spec(TrainingJobSpec, spec)
        generation = meta.get("generation")
        if error:
            logger.warning("invalid spec: %s", error)
            patch.status.update(conditions_patch(status, generation, [("Ready", False, "InvalidSpec", error)]))
            return
        patch.status.update(conditions_patch(status, generation, [
            ("Ready", False, "Accepted", "spec is valid; waiting for the controller to converge")]))
