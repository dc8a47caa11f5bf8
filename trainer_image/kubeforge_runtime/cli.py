"""What the runtime's one-shot steps (``curate``, ``evaluate``) share: a store backend for a
URI from the pod's environment, and their camelCase JSON settings (``--settings``), validated
so that an error names the key."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from kubeforge.api import contract
from kubeforge.store.backends import ObjectBackend, S3Options, StoreError, open_backend
from pydantic import BaseModel, ValidationError

Settings = TypeVar("Settings", bound=BaseModel)


class SettingsError(ValueError):
    """The settings cannot work; the message names the key."""


def local_path(uri: str) -> Path | None:
    """The path a file:// (or bare path) URI names; None for another scheme (s3://)."""
    parsed = urlparse(uri)
    return Path(parsed.path if parsed.scheme else uri) if parsed.scheme in ("", "file") else None


def s3_options(endpoint: str | None, env: Mapping[str, str]) -> S3Options:
    """S3 settings and credentials from the pod's environment (``endpoint`` first)."""
    return S3Options(
        endpoint_url=endpoint or env.get(contract.ENV_S3_ENDPOINT) or None,
        region=env.get(contract.ENV_S3_REGION) or None,
        access_key_id=env.get(contract.ENV_S3_ACCESS_KEY_ID) or None,
        secret_access_key=env.get(contract.ENV_S3_SECRET_ACCESS_KEY) or None,
        force_path_style=contract.s3_force_path_style(env.get(contract.ENV_S3_FORCE_PATH_STYLE)))


def open_uri(uri: str, endpoint: str | None, env: Mapping[str, str]) -> ObjectBackend:
    """A store backend for ``uri``, as ``s3_options`` says."""
    return open_backend(uri, s3_options(endpoint, env))


def parse_settings_document(raw: str | None, model: type[Settings], what: str) -> Settings:
    """``--settings``: a JSON document, or ``@path`` of a file holding one; None or empty: the
    defaults. ``what`` names the settings in errors ("curation settings")."""
    if raw is None or not raw.strip():
        return model()
    text = raw
    if raw.startswith("@"):
        try:
            text = Path(raw[1:]).read_text()
        except OSError as e:
            raise SettingsError(f"cannot read settings file {raw[1:]}: {e.strerror}") from None
    try:
        doc = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise SettingsError(f"{what} are not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise SettingsError(f"{what} must be a JSON object, got {type(doc).__name__}")
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        parts = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else str(err["msg"]).removeprefix("Value error, ")
            parts.append(f"{key}: {msg}" if key else msg)
        raise SettingsError(f"invalid {what}: " + "; ".join(parts)) from None


def run_step(run: Callable[[list[str] | None, Mapping[str, str]], int], argv: list[str] | None,
             env: Mapping[str, str] | None) -> int:
    """A step's ``run(argv, env)`` (the process environment by default); a store still
    unreachable after its retries is exit 1 (retrying may help), with the error on stderr."""
    try:
        return run(argv, os.environ if env is None else env)
    except StoreError as e:
        print(f"kubeforge: store error: {e}", file=sys.stderr, flush=True)
        return 1
