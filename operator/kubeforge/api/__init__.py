"""Typed models of the kubeforge.dev/v1alpha1 kinds: the single source of the CRD schemas,
of `kubectl explain` text and of docs/reference.md."""

from kubeforge.api.checkpointpolicy import CheckpointPolicy, CheckpointPolicySpec, CheckpointPolicyStatus
from kubeforge.api.common import API_VERSION, GROUP, VERSION, Kind
from kubeforge.api.dataset import Dataset, DatasetSpec, DatasetStatus
from kubeforge.api.flywheel import Flywheel, FlywheelSpec, FlywheelStatus
from kubeforge.api.inferenceservice import InferenceService, InferenceServiceSpec, InferenceServiceStatus
from kubeforge.api.trainingjob import TrainingJob, TrainingJobSpec, TrainingJobStatus

KINDS: tuple[type[Kind], ...] = (TrainingJob, CheckpointPolicy, InferenceService, Dataset, Flywheel)

__all__ = [
    "API_VERSION", "GROUP", "KINDS", "VERSION", "CheckpointPolicy", "CheckpointPolicySpec",
    "CheckpointPolicyStatus", "Dataset", "DatasetSpec", "DatasetStatus", "Flywheel", "FlywheelSpec", "FlywheelStatus",
    "InferenceService", "InferenceServiceSpec", "InferenceServiceStatus", "Kind",
    "TrainingJob", "TrainingJobSpec", "TrainingJobStatus",
]
