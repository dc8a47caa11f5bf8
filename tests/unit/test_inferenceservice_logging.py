"""InferenceService spec.logging on the operator's side (issue 17): the capture flags and
environment of the server container, where the capture goes and with which credentials, the
CaptureReady / DriftDetected conditions, the drift decision (PSI against the export's baseline)
and its gauge, and the chart's drift alert. Pure, or with the store on the local disk."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import tools
import yaml
from kubeforge import k8s
from kubeforge.api import CheckpointPolicySpec, InferenceServiceSpec
from kubeforge.api.common import condition
from kubeforge.api.inferenceservice import DriftSettings
from kubeforge.controllers.inferenceservice import handlers
from kubeforge.controllers.inferenceservice import manifests as ch
from kubeforge.controllers.inferenceservice import plan as ctl
from kubeforge.controllers.inferenceservice.manifests import Owner, ResolvedCapture, ResolvedModel
from kubeforge.controllers.store_access import StoreAccess
from kubeforge.settings import OperatorSettings
from kubeforge.store import flywheel
from kubeforge.store.flywheel import Profile
from prometheus_client import REGISTRY

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
OWNER = Owner("chat", "team-a", "uid-1")
MODEL = ResolvedModel(uri="s3://kubeforge/team-a/job/runs/u/export", revision="2025-01-02T03:04:05Z", step=100,
                      s3_endpoint="http://minio:9000", s3_region="us-east-1", credentials_secret="s3-creds")
CAPTURE = ResolvedCapture(uri="s3://flywheel/prod/team-a/chat/capture", credentials_secret="capture-creds",
                          s3_endpoint="http://minio:9000")
S3_POLICY = CheckpointPolicySpec.model_validate({
    "schedule": {"everySteps": 10},
    "storage": {"s3": {"bucket": "ckpt", "prefix": "runs/", "endpoint": "http://minio:9000", "region": "eu-west-1",
                       "credentialsSecretRef": {"name": "trainer-rw"}}}})
VOLUME_POLICY = CheckpointPolicySpec.model_validate({
    "schedule": {"everySteps": 10}, "storage": {"volume": {"claimName": "ckpt"}}})
LOGGING = {"sampleRate": 0.25, "store": {"uri": "s3://flywheel/prod", "credentialsSecretRef": {"name": "capture-creds"},
                                         "s3Endpoint": "http://minio:9000"},
           "redact": {"patterns": [{"name": "EMPLOYEE_ID", "regex": "E[0-9]{6}"}, {"name": "TICKET", "regex": "T-\\d+"}]},
           "maxRecordBytes": 4096, "shardSeconds": 20, "feedbackTtlSeconds": 3600, "drift": {"windowPrompts": 300}}
FEEDBACK_KEY = hmac.new(b"uid-1", b"kubeforge-feedback", hashlib.sha256).hexdigest()


def spec(**over: Any) -> InferenceServiceSpec:
    base: dict[str, Any] = {"model": {"trainingJobRef": {"name": "job"}}}
    base.update(over)
    return InferenceServiceSpec.model_validate(base)


def container(dep: dict[str, Any]) -> dict[str, Any]:
    return dep["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


ENGINE_ARGS = ["--model", MODEL.uri, "--served-model-name", "chat", "--host", "0.0.0.0", "--port", "8000",
               "--download-dir", "/var/cache/kubeforge/models", "--shutdown-timeout", "30", "--max-num-seqs", "64",
               "--max-num-batched-tokens", "512", "--max-queue-len", "256", "--block-size", "16", "--dtype", "auto"]
MODEL_ENV = [{"name": "HOME", "value": "/tmp"}, {"name": "PYTHONUNBUFFERED", "value": "1"},
             {"name": "KUBEFORGE_MODEL_REVISION", "value": MODEL.revision},
             {"name": "AWS_ENDPOINT_URL", "value": "http://minio:9000"}, {"name": "AWS_REGION", "value": "us-east-1"}]


# ---------------------------------------------------------------------------- the server container

def test_without_logging_the_server_is_rendered_as_before() -> None:
    for capture in (None, CAPTURE):  # a capture without spec.logging renders nothing either
        c = container(ch.build_deployment(OWNER, spec(), MODEL, capture=capture))
        assert c["args"] == ENGINE_ARGS
        assert c["env"] == MODEL_ENV
        assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]


def test_with_logging_the_server_gets_exactly_the_capture_flags_and_environment() -> None:
    c = container(ch.build_deployment(OWNER, spec(logging=LOGGING), MODEL, capture=CAPTURE))
    assert c["args"] == ENGINE_ARGS + [
        "--capture-uri", "s3://flywheel/prod/team-a/chat/capture", "--capture-s3-endpoint", "http://minio:9000",
        "--capture-sample-rate", "0.25",
        "--capture-redact-pattern", "EMPLOYEE_ID=E[0-9]{6}", "--capture-redact-pattern", "TICKET=T-\\d+",
        "--capture-max-record-bytes", "4096", "--capture-shard-seconds", "20", "--feedback-ttl-seconds", "3600",
        "--drift-window", "300"]
    assert c["env"] == MODEL_ENV + [
        {"name": "KUBEFORGE_CAPTURE_AWS_ACCESS_KEY_ID",
         "valueFrom": {"secretKeyRef": {"name": "capture-creds", "key": "AWS_ACCESS_KEY_ID"}}},
        {"name": "KUBEFORGE_CAPTURE_AWS_SECRET_ACCESS_KEY",
         "valueFrom": {"secretKeyRef": {"name": "capture-creds", "key": "AWS_SECRET_ACCESS_KEY"}}},
        {"name": "KUBEFORGE_POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
        {"name": "KUBEFORGE_FEEDBACK_KEY", "value": FEEDBACK_KEY}]
    # the model's credentials stay the only envFrom: the capture's never shadow AWS_*
    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    # the served revision reaches the records through the variable the server already reads
    assert {"name": "KUBEFORGE_MODEL_REVISION", "value": MODEL.revision} in c["env"]


def test_defaults_redaction_off_and_the_api_key_as_feedback_key() -> None:
    logging = {"store": {"uri": "s3://flywheel", "credentialsSecretRef": {"name": "cc"}}, "redact": {"enabled": False,
               "patterns": [{"name": "X", "regex": "x"}]}}
    capture = ResolvedCapture(uri="s3://flywheel/team-a/chat/capture", credentials_secret="cc")
    s = spec(logging=logging, apiKeySecretRef={"name": "chat-key"}, env=[{"name": "USER_VAR", "value": "1"}])
    c = container(ch.build_deployment(OWNER, s, MODEL, capture=capture))
    assert c["args"][len(ENGINE_ARGS):] == [
        "--capture-uri", "s3://flywheel/team-a/chat/capture", "--capture-sample-rate", "1.0", "--no-capture-redact",
        "--capture-max-record-bytes", "65536", "--capture-shard-seconds", "60", "--feedback-ttl-seconds", "604800",
        "--drift-window", "500"]
    env = {e["name"]: e for e in c["env"]}
    assert env["KUBEFORGE_FEEDBACK_KEY"] == {"name": "KUBEFORGE_FEEDBACK_KEY", "valueFrom": {
        "secretKeyRef": {"name": "chat-key", "key": "api-key"}}}
    assert env["KUBEFORGE_API_KEY"]["valueFrom"] == env["KUBEFORGE_FEEDBACK_KEY"]["valueFrom"]
    assert c["env"][-1] == {"name": "USER_VAR", "value": "1"}, "the user's variables come last (they win)"


def test_the_capture_stores_region_and_addressing_reach_the_server() -> None:
    """Not the model's: the server's AWS_REGION and AWS_ENDPOINT_URL are its model store's."""
    capture = ResolvedCapture(uri="s3://flywheel/team-a/chat/capture", credentials_secret="cc",
                              s3_region="eu-west-1", s3_force_path_style=False)
    args = ch.capture_args(spec(logging=LOGGING), capture)
    assert args[:5] == ["--capture-uri", capture.uri, "--capture-s3-region", "eu-west-1",
                        "--no-capture-s3-force-path-style"]
    assert "--capture-s3-endpoint" not in args


def test_a_capture_store_without_an_endpoint_ignores_the_models_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubeforge_runtime.serve.capture import open_capture_backend

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.models:9000")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    own = open_capture_backend("s3://flywheel/capture", access_key_id="a", secret_access_key="b",
                               region="eu-west-1", force_path_style=False)
    assert own.client.meta.endpoint_url == "https://s3.eu-west-1.amazonaws.com", own.client.meta.endpoint_url
    assert own.client.meta.config.s3["addressing_style"] == "auto"
    minio = open_capture_backend("s3://flywheel/capture", "http://minio.capture:9000", "a", "b")
    assert minio.client.meta.endpoint_url == "http://minio.capture:9000"


def test_the_derived_feedback_key_is_one_per_service_object() -> None:
    """Every replica (and every rollout) of a service signs with the same key; a service created
    again under the same name gets another."""
    s = spec(logging=LOGGING)
    keys = {e["value"] for n in range(2) for e in container(ch.build_deployment(
        OWNER, s, dataclasses.replace(MODEL, revision=f"r{n}"), capture=CAPTURE))["env"]
        if e["name"] == "KUBEFORGE_FEEDBACK_KEY"}
    assert keys == {FEEDBACK_KEY}
    assert ch.derived_feedback_key("uid-2") != FEEDBACK_KEY and len(FEEDBACK_KEY) == 64


def test_the_capture_store_is_reachable_through_the_network_policy() -> None:
    """The servers' NetworkPolicy restricts ingress only: the capture store, like the model's,
    is reached without an egress rule."""
    np = ch.build_network_policy(OWNER, spec(logging=LOGGING))
    assert np["spec"]["policyTypes"] == ["Ingress"] and "egress" not in np["spec"]


# ---------------------------------------------------------------------------- store and credentials

def logging_of(**store: Any) -> Any:
    s = spec(logging={"sampleRate": 0.5, "store": store})
    assert s.logging is not None
    return s.logging


def test_a_uri_store_captures_under_namespace_and_name_with_its_own_secret() -> None:
    res = ctl.resolve_capture(OWNER, logging_of(uri="s3://flywheel/prod/", credentialsSecretRef={"name": "cc"},
                                                s3Endpoint="http://s3.local"), None, False)
    assert (res.ready, res.reason) == (True, "CaptureStoreResolved")
    assert res.capture == ResolvedCapture(uri="s3://flywheel/prod/" + flywheel.capture_prefix("team-a", "chat"),
                                          credentials_secret="cc", s3_endpoint="http://s3.local")
    assert res.capture.uri == "s3://flywheel/prod/team-a/chat/capture"
    assert res.store == ("team-a", "s3://flywheel/prod")


def test_a_policy_store_uses_its_root_and_endpoint_and_an_own_secret() -> None:
    res = ctl.resolve_capture(OWNER, logging_of(checkpointPolicyRef={"name": "ckpt"},
                                                credentialsSecretRef={"name": "capture-writer"}), S3_POLICY, False)
    assert res.ready and res.capture == ResolvedCapture(
        uri="s3://ckpt/runs/team-a/chat/capture", credentials_secret="capture-writer", s3_endpoint="http://minio:9000",
        s3_region="eu-west-1", s3_force_path_style=True)
    assert res.store == ("team-a", "ckpt")


def test_the_policys_secret_reaches_servers_only_where_the_operator_allows_it() -> None:
    lg = logging_of(checkpointPolicyRef={"name": "ckpt"})
    refused = ctl.resolve_capture(OWNER, lg, S3_POLICY, allow_policy_credentials=False)
    assert (refused.ready, refused.reason, refused.capture) == (False, "CaptureCredentialsRequired", None)
    assert "logging.store.credentialsSecretRef must name" in refused.message and "trainer-rw" in refused.message
    assert "security.servingPolicyCredentials" in refused.message
    allowed = ctl.resolve_capture(OWNER, lg, S3_POLICY, allow_policy_credentials=True)
    assert allowed.ready and allowed.capture is not None and allowed.capture.credentials_secret == "trainer-rw"
    assert "read-write Secret trainer-rw" in allowed.message
    named = ctl.resolve_capture(OWNER, logging_of(checkpointPolicyRef={"name": "ckpt"},
                                                  credentialsSecretRef={"name": "trainer-rw"}), S3_POLICY, False)
    assert named.ready and "can write and delete checkpoints" in named.message


def test_a_volume_or_missing_policy_resolves_no_capture() -> None:
    lg = logging_of(checkpointPolicyRef={"name": "ckpt"}, credentialsSecretRef={"name": "cc"})
    volume = ctl.resolve_capture(OWNER, lg, VOLUME_POLICY, True)
    assert (volume.ready, volume.reason, volume.capture) == (False, "StoreUnsupported", None)
    missing = ctl.resolve_capture(OWNER, lg, None, True)
    assert (missing.ready, missing.reason) == (False, "CheckpointPolicyNotFound") and "ckpt" in missing.message
    invalid = ctl.resolve_capture(OWNER, lg, None, True, "CheckpointPolicy ckpt of logging.store is invalid: x")
    assert (invalid.ready, invalid.reason, invalid.message) == (
        False, "CheckpointPolicyInvalid", "CheckpointPolicy ckpt of logging.store is invalid: x")


# ---------------------------------------------------------------------------- status

RESOLVED = ctl.ModelResolution(True, "ExportFound", "found", MODEL)


def conds(st: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]}


def test_status_shows_the_capture_and_starts_drift_unknown() -> None:
    s = spec(logging=LOGGING)
    res = ctl.CaptureResolution(True, "CaptureStoreResolved", "capturing", CAPTURE, ("team-a", "s3://flywheel/prod"))
    st = ctl.status_patch(OWNER, s, {}, 1, RESOLVED, None, None, res)
    assert st["capture"] == {"uri": CAPTURE.uri, "sampleRate": 0.25}
    assert conds(st)["CaptureReady"] == ("True", "CaptureStoreResolved")
    assert conds(st)["DriftDetected"] == ("Unknown", "NotMeasured")
    # a drift reading the drift pass wrote stays as it is
    measured = ctl.drift_patch(st, ctl.DriftDecision("True", "MajorDrift", "psi", {"level": "major"}, {}))
    again = ctl.status_patch(OWNER, s, {**st, **measured}, 1, RESOLVED, None, None, res)
    assert conds(again)["DriftDetected"] == ("True", "MajorDrift")
    # and so do the capture's own fields when the caller did not resolve it (availability refreshes)
    refresh = ctl.status_patch(OWNER, s, {**st, **measured}, 1, RESOLVED, None)
    assert "capture" not in refresh and conds(refresh)["CaptureReady"] == ("True", "CaptureStoreResolved")


def test_an_unresolved_capture_or_removed_logging_clears_what_it_showed() -> None:
    s = spec(logging=LOGGING)
    ok = ctl.CaptureResolution(True, "CaptureStoreResolved", "capturing", CAPTURE, ("ns", "x"))
    st = ctl.status_patch(OWNER, s, {}, 1, RESOLVED, None, None, ok)
    st["drift"] = {"psi": {"prompt_length": 0.3}, "level": "major"}
    bad = ctl.CaptureResolution(False, "CaptureCredentialsRequired", "give the servers a credential")
    unresolved = ctl.status_patch(OWNER, s, st, 1, RESOLVED, None, None, bad)
    assert unresolved["capture"] is None and unresolved["drift"] is None
    assert conds(unresolved)["CaptureReady"] == ("False", "CaptureCredentialsRequired")
    assert conds(unresolved)["DriftDetected"] == ("Unknown", "CaptureNotReady")
    assert conds(ctl.status_patch(OWNER, s, unresolved, 1, RESOLVED, None, None, ok))["DriftDetected"] == (
        "Unknown", "NotMeasured")
    removed = ctl.status_patch(OWNER, spec(), st, 2, RESOLVED, None)
    assert removed["capture"] is None and removed["drift"] is None
    assert set(conds(removed)) == {"ModelReady", "Available", "Ready"}


# ---------------------------------------------------------------------------- drift

def profile(lengths: list[int], token: int = 0, n: int = 1) -> Profile:
    """``n`` copies of prompts of these token counts, every token id ``token``."""
    p = Profile()
    for _ in range(n):
        for length in lengths:
            p.add([token] * length)
    return p


BASE_PROFILE = profile([10, 20, 40, 80], n=100)
BASE = ctl.Baseline("s3://kubeforge/team-a/job/runs/u/export/data-profile.json", BASE_PROFILE)
SETTINGS = DriftSettings(minPrompts=200)
NOW = "2026-12-02T18:00:00Z"


def decide(*live: Profile, baseline: ctl.Baseline = BASE, settings: DriftSettings = SETTINGS,
           skipped: tuple[str, ...] = ()) -> ctl.DriftDecision:
    return ctl.decide_drift(settings, ctl.LiveProfiles(tuple(live), skipped), baseline, NOW)


def test_the_same_distribution_is_stable_and_merges_every_server() -> None:
    # each server alone has fewer prompts than minPrompts; together they have enough
    half = profile([10, 20, 40, 80], n=30)
    assert decide(half).reason == "NotEnoughPrompts"
    d = decide(half, half)
    assert (d.status, d.reason) == ("False", "Stable")
    assert d.psi == {"prompt_length": 0.0, "token_frequency": 0.0}
    assert d.drift == {"psi": d.psi, "level": "stable", "prompts": 240, "baseline": BASE.uri, "time": NOW}
    assert "240 live prompts (2 server profile(s))" in d.message


def test_a_shift_is_minor_or_major_by_the_services_thresholds() -> None:
    live = profile([10, 20, 40, 80], n=50)
    live.merge(profile([40], n=60))  # more prompts of one length: a moderate shift
    psi = flywheel.psi(BASE_PROFILE.prompt_length, live.prompt_length)
    assert 0.1 < psi < 0.25
    minor = decide(live)
    assert (minor.status, minor.reason) == ("False", "MinorDrift")
    assert minor.drift is not None and minor.drift["level"] == "minor"
    assert minor.psi["prompt_length"] == round(psi, 4)
    strict = decide(live, settings=DriftSettings(minPrompts=200, minorThreshold=0.01, majorThreshold=0.05))
    assert (strict.status, strict.reason) == ("True", "MajorDrift") and "prompt_length above majorThreshold" in strict.message
    far = decide(profile([3000], token=7, n=300))
    assert (far.status, far.reason) == ("True", "MajorDrift")
    assert far.psi["prompt_length"] > 0.25 and far.psi["token_frequency"] > 0.25


def test_without_a_baseline_or_enough_prompts_drift_is_unknown() -> None:
    live = profile([10], n=500)
    none = decide(live, baseline=ctl.Baseline(BASE.uri, None))
    assert (none.status, none.reason, none.psi) == ("Unknown", "NoBaseline", {})
    assert BASE.uri in none.message and none.drift is not None and none.drift["prompts"] == 500
    empty = decide(live, baseline=ctl.Baseline(BASE.uri, Profile()))
    assert empty.reason == "NoBaseline"
    pvc = decide(live, baseline=ctl.Baseline(None))
    assert pvc.reason == "NoBaseline" and "pvc://" in pvc.message
    few = decide(profile([10], n=199))
    assert (few.status, few.reason, few.psi) == ("Unknown", "NotEnoughPrompts", {})
    assert "199 live prompts" in few.message and "minPrompts=200" in few.message
    assert decide().drift == {"psi": {}, "level": None, "prompts": 0, "baseline": BASE.uri, "time": NOW}


def test_a_profile_of_other_buckets_is_left_out() -> None:
    odd = Profile(prompts=1000, prompt_length=[1000], token_frequency=[5] * 10)
    d = decide(odd, profile([10, 20, 40, 80], n=60), skipped=("profiles/broken.json",))
    assert d.reason == "Stable" and d.drift is not None and d.drift["prompts"] == 240
    assert "1 unreadable skipped" in d.message


def test_an_event_only_when_the_condition_changes() -> None:
    stable = ctl.DriftDecision("False", "Stable", "a", {}, {})
    assert ctl.drift_changed(None, stable)
    assert not ctl.drift_changed({"status": "False", "reason": "Stable", "message": "b"}, stable)
    assert ctl.drift_changed({"status": "False", "reason": "MinorDrift"}, stable)


def test_the_baseline_is_next_to_the_served_model() -> None:
    assert ctl.baseline_uri(MODEL) == f"{MODEL.uri}/data-profile.json"
    assert ctl.baseline_uri(ResolvedModel(uri="s3://models/llama/")) == "s3://models/llama/data-profile.json"
    assert ctl.baseline_uri(ResolvedModel(uri="pvc://models/llama")) is None


# ---------------------------------------------------------------------------- the drift pass

def psi_sample(feature: str, name: str = "chat") -> float | None:
    return REGISTRY.get_sample_value("kubeforge_drift_psi", {"namespace": "team-a", "service": name,
                                                             "feature": feature})


def wait_until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class FakeStatus:
    """The InferenceService's status as update_status would keep it, and the Events posted."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {"observedGeneration": 1, "conditions": []}
        self.events: list[tuple[str, bool]] = []

    def write(self, owner: Owner, compute: Any) -> dict[str, Any] | None:
        out = compute(dict(self.status))
        if out is None:
            return None
        self.status = {**self.status, **{k: v for k, v in out.items()}}
        return out  # type: ignore[no-any-return]

    def event(self, body: Any, reason: str, message: str, warning: bool = False) -> None:
        self.events.append((reason, warning))


def drift_condition(fake: FakeStatus) -> dict[str, Any]:
    found = condition(fake.status["conditions"], "DriftDetected")
    assert found is not None
    return dict(found)


@pytest.fixture
def drift_pass(monkeypatch: pytest.MonkeyPatch) -> Any:
    fake = FakeStatus()
    monkeypatch.setattr(handlers, "_write_status", fake.write)
    monkeypatch.setattr(k8s, "record_event", fake.event)
    answers: dict[str, Any] = {"live": ctl.LiveProfiles((profile([10, 20, 40, 80], n=60),)), "baseline": BASE}
    monkeypatch.setattr(handlers, "read_live_profiles", lambda *a: answers["live"])
    monkeypatch.setattr(handlers, "read_baseline", lambda *a: answers["baseline"])
    state = handlers.InferenceServices(OperatorSettings(), StoreAccess())
    s = spec(logging=LOGGING)
    capture = ctl.CaptureResolution(True, "CaptureStoreResolved", "m", CAPTURE, ("team-a", "drift-capture"))
    model = dataclasses.replace(RESOLVED, store=("team-a", "drift-model"))
    yield state, s, capture, model, fake, answers
    for key in list(state.capturing):  # reads still landing apply nothing once no service captures
        state.forget(key)
    state.stores.close()


def test_the_drift_pass_sets_status_gauge_and_events_and_removes_the_gauge(drift_pass: Any) -> None:
    state, s, capture, model, fake, answers = drift_pass
    key = ("team-a", "chat")
    handlers.track_capture(state, OWNER, s, capture, model)
    assert key in state.capturing
    handlers.measure_drift(state, key)  # starts the reads; their answers are applied when they land
    wait_until(lambda: condition(fake.status["conditions"], "DriftDetected") is not None)
    assert drift_condition(fake)["reason"] == "Stable"
    assert fake.status["drift"]["level"] == "stable" and psi_sample("prompt_length") == 0.0
    assert fake.events == [("Stable", False)]
    answers["live"] = ctl.LiveProfiles((profile([3000], token=7, n=300),))
    state.stores.forget(lambda k: True)  # the next pass reads again
    handlers.measure_drift(state, key)
    wait_until(lambda: fake.status["drift"]["level"] == "major")
    assert drift_condition(fake)["status"] == "True"
    wait_until(lambda: (psi_sample("token_frequency") or 0) > 0.25)
    assert ("MajorDrift", True) in fake.events and len(fake.events) == 2
    # spec.logging removed: no reading, no series
    handlers.track_capture(state, OWNER, spec(), None, model)
    assert key not in state.capturing and psi_sample("prompt_length") is None and psi_sample("token_frequency") is None


def test_a_deleted_service_loses_its_gauge_series(drift_pass: Any) -> None:
    state, s, capture, model, fake, answers = drift_pass
    owner = Owner("gone", "team-a", "uid-9")
    handlers.track_capture(state, owner, s, capture, model)
    handlers.measure_drift(state, ("team-a", "gone"))
    wait_until(lambda: psi_sample("prompt_length", "gone") is not None)
    state.forget(("team-a", "gone"))
    assert psi_sample("prompt_length", "gone") is None and ("team-a", "gone") not in state.capturing
    handlers.track_capture(state, owner, s, capture, model)  # a reconcile that ended after the delete
    assert ("team-a", "gone") not in state.capturing


def test_an_unreadable_capture_store_says_so(drift_pass: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    state, s, capture, model, fake, answers = drift_pass

    def fail(*_: Any) -> ctl.LiveProfiles:
        raise LookupError("Secret capture-creds does not exist")

    monkeypatch.setattr(handlers, "read_live_profiles", fail)
    owner = Owner("broken", "team-a", "uid-3")
    handlers.track_capture(state, owner, s, capture, model)
    handlers.measure_drift(state, ("team-a", "broken"))
    wait_until(lambda: condition(fake.status["conditions"], "DriftDetected") is not None)
    drift = condition(fake.status["conditions"], "DriftDetected")
    assert drift is not None and (drift["status"], drift["reason"]) == ("Unknown", "ProfilesUnreadable")
    assert "capture-creds" in drift["message"] and "drift" not in fake.status


def test_profiles_are_read_fresh_only_and_the_baseline_next_to_the_export(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(k8s, "read_secret", lambda ns, name: {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
    capture_dir = tmp_path / "store" / "team-a" / "chat" / "capture"
    (capture_dir / "profiles").mkdir(parents=True)
    fresh = profile([10, 20], n=5)
    (capture_dir / "profiles" / "chat-server-a.json").write_bytes(fresh.to_json())
    (capture_dir / "profiles" / "chat-server-b.json").write_bytes(b"{not json")
    (capture_dir / "profiles" / "chat-server-c.json").write_bytes(Profile(prompt_length=[1]).to_json())
    old = capture_dir / "profiles" / "chat-server-gone.json"
    old.write_bytes(profile([10], n=99).to_json())
    stale = time.time() - ctl.PROFILE_MAX_AGE_S - 60
    os.utime(old, (stale, stale))
    capture = ResolvedCapture(uri=f"file://{capture_dir}", credentials_secret="cc")
    live = handlers.read_live_profiles("team-a", capture, 1.0)
    assert live.profiles == (fresh,)
    assert sorted(live.skipped) == ["profiles/chat-server-b.json", "profiles/chat-server-c.json"]

    export = tmp_path / "store" / "team-a" / "job" / "export"
    export.mkdir(parents=True)
    model = ResolvedModel(uri=f"file://{export}", credentials_secret="s3-creds")
    assert handlers.read_baseline("team-a", model, 1.0) == ctl.Baseline(f"file://{export}/data-profile.json", None)
    (export / flywheel.BASELINE_PROFILE_NAME).write_bytes(BASE_PROFILE.to_json())
    assert handlers.read_baseline("team-a", model, 1.0).profile == BASE_PROFILE


# ---------------------------------------------------------------------------- the chart's alert

def test_the_chart_alerts_on_major_drift_for_ten_minutes() -> None:
    out = subprocess.run([str(tools.binary("helm")), "template", "kf", str(REPO / "charts" / "kubeforge"),
                          "--kube-version", "1.35.0", "--show-only", "templates/prometheusrule.yaml",
                          "--set", "metrics.prometheusRule.enabled=true"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    rule = yaml.safe_load(out.stdout)
    (alert,) = [r for g in rule["spec"]["groups"] for r in g["rules"] if r.get("alert") == "KubeforgeDriftDetected"]
    assert alert["expr"].strip() == "kubeforge_drift_psi > 0.25" and alert["for"] == "10m"
    assert alert["labels"] == {"severity": "warning"}
    assert "{{ $labels.service }}" in alert["annotations"]["summary"]
