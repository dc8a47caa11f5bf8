"""Evaluation settings: the camelCase document a Flywheel's ``spec.evaluation`` becomes
(``--settings``); every key optional, an unknown key an error."""

from __future__ import annotations

from kubeforge.store.evaluation import GateRule, check_rule_names
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from kubeforge_runtime.cli import parse_settings_document


class EvaluationSettings(BaseModel):
    """How much to score and how; ``gate`` is what the candidate must show, per metric
    (``kubeforge.store.evaluation`` names the metrics and how a gain is counted)."""

    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True)

    #: records per suite, the first in file order (a version's eval split is in a stable order)
    max_records: int = Field(1000, ge=1)
    #: a reference of at most this many words is a short answer: exact match and overlap apply
    short_answer_words: int = Field(16, ge=1)
    #: greedy answer length cap, tokens
    max_new_tokens: int = Field(64, ge=1, le=4096)
    #: records per forward pass (log-likelihood) and sequences per engine step (answers)
    batch_size: int = Field(8, ge=1, le=256)
    #: overlaps closer than this are a tie in the preference score
    tie_margin: float = Field(0.0, ge=0, le=1)
    gate: dict[str, GateRule] = Field(default_factory=dict)

    @field_validator("gate")
    @classmethod
    def _known_metrics(cls, v: dict[str, GateRule]) -> dict[str, GateRule]:
        check_rule_names(v)
        return v

    def as_document(self) -> dict[str, object]:
        return self.model_dump(by_alias=True, mode="json", exclude_none=True)


def parse_settings(raw: str | None) -> EvaluationSettings:
    return parse_settings_document(raw, EvaluationSettings, "evaluation settings")
