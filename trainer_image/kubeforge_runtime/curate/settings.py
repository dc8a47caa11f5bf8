"""Curation settings: the camelCase document of ``Dataset.spec.curation`` (every key optional).

The operator hands ``spec.curation`` over as it is (``--settings``); a key this module does not
know is an error, not a silently ignored setting.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from kubeforge_runtime.cli import parse_settings_document
from kubeforge_runtime.redact import Redactor


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True)


class FeedbackSettings(_Section):
    """Keep by feedback: a rated record is kept when its latest rating scores at least
    ``min_score`` (``flywheel.feedback_score``); an unrated one unless ``require_feedback``."""

    min_score: float = Field(0.5, ge=0, le=1)
    require_feedback: bool = False


class DedupSettings(_Section):
    """Exact duplicates by hash of (prompt or messages, target); near duplicates by datasketch
    MinHash + LSH on word shingles, at a Jaccard similarity of ``near_duplicate_threshold``
    (None turns that step off; ``dedup.py`` says how candidates are checked). The earliest
    record of a group is kept."""

    exact: bool = True
    near_duplicate_threshold: float | None = Field(0.8, gt=0, le=1)
    shingle_words: int = Field(5, ge=1, le=32)
    num_perm: int = Field(128, ge=16, le=1024)


_SCRIPT_NAME = re.compile(r"^[A-Z][A-Za-z_]*$")


class FilterSettings(_Section):
    """Length and quality filters; ``filters.py`` says what each one measures."""

    min_prompt_chars: int = Field(1, ge=0)
    max_prompt_chars: int = Field(16000, ge=1)
    min_target_chars: int = Field(1, ge=0)
    max_target_chars: int = Field(16000, ge=1)
    min_alpha_ratio: float = Field(0.3, ge=0, le=1)
    max_repeat_ratio: float = Field(0.5, gt=0, le=1)
    scripts: list[str] = Field(default_factory=lambda: ["Latin"])
    drop_finish_reasons: list[str] = Field(default_factory=list)

    @field_validator("scripts")
    @classmethod
    def _script_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _SCRIPT_NAME.match(name):
                raise ValueError(f"{name!r} is not a Unicode script name (Latin, Cyrillic, Greek, Han, Arabic...)")
        return v

    @model_validator(mode="after")
    def _ranges(self) -> FilterSettings:
        if self.min_prompt_chars > self.max_prompt_chars:
            raise ValueError("minPromptChars must not exceed maxPromptChars")
        if self.min_target_chars > self.max_target_chars:
            raise ValueError("minTargetChars must not exceed maxTargetChars")
        return self


class RedactSettings(_Section):
    """PII redaction again (capture may have run with it off). ``patterns`` is ``{NAME: regex}``,
    or the Dataset's list form ``[{name, regex}]``."""

    enabled: bool = True
    patterns: dict[str, str] = Field(default_factory=dict)

    @field_validator("patterns", mode="before")
    @classmethod
    def _list_form(cls, v: Any) -> Any:
        if isinstance(v, list):
            out: dict[str, Any] = {}
            for i, item in enumerate(v):
                if not isinstance(item, dict) or set(item) != {"name", "regex"}:
                    raise ValueError(f"item {i} must be an object with exactly name and regex")
                out[item["name"]] = item["regex"]
            return out
        return v

    @model_validator(mode="after")
    def _compiles(self) -> RedactSettings:
        self.redactor()  # a bad name or regex fails here, with the pattern's name
        return self

    def redactor(self) -> Redactor:
        return Redactor(self.patterns)


class SplitSettings(_Section):
    """Eval share, decided per record by sha256("kubeforge-split/" + completion id)."""

    eval_percent: float = Field(10, ge=0, le=100)


class CurationSettings(_Section):
    """All of curation's settings."""

    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)  # type: ignore[arg-type]
    dedup: DedupSettings = Field(default_factory=DedupSettings)  # type: ignore[arg-type]
    filters: FilterSettings = Field(default_factory=FilterSettings)  # type: ignore[arg-type]
    redact: RedactSettings = Field(default_factory=RedactSettings)
    split: SplitSettings = Field(default_factory=SplitSettings)  # type: ignore[arg-type]

    def as_document(self) -> dict[str, Any]:
        """The effective settings, camelCase, defaults filled in (what the manifest records)."""
        return self.model_dump(by_alias=True, mode="json")


def parse_settings(raw: str | None) -> CurationSettings:
    """``--settings``: a JSON document, or ``@path`` of a file holding one; None or empty: defaults."""
    return parse_settings_document(raw, CurationSettings, "curation settings")
