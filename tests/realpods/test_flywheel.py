"""The data flywheel on real pods (docs/flywheel.md): the tiny model trained and exported by
two real workers is served by two real server pods (examples/05) that capture every request,
redacted, into MinIO. A scripted user (hack/flywheel_client.py, run in a real node's network
namespace, through the ClusterIP Service that spreads it over both replicas) chats with known
preferences and rates the answers; a rating sent to the replica that did not serve is
accepted. The Dataset (examples/06) is curated by a real pod; its manifest's counts follow
from what the user sent and liked, and no PII reaches it. A fine-tune (examples/07) of the
export on that Dataset succeeds on a real pod, and when the user's traffic shifts, the
operator sets DriftDetected. Then a Flywheel (examples/10) runs one whole cycle while the user
keeps chatting: a version curated for it, a fine-tune on real pods, the evaluation pod's gate,
shadow and a canary step judged on the router's counters, and promotion, with no failed request.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
import yaml
from devcluster import Cluster

from tests.cluster.test_trainingjob_controller import is_, job_status
from tests.fixtures.cluster import REPO, kubectl_json, wait_for
from tests.fixtures.realpods import ChartOperator, s3_secret
from tests.realpods.test_train_and_serve import in_node, wait_succeeded

pytestmark = [pytest.mark.realpods, pytest.mark.timeout(3000)]
SERVICE, DATASET, FINETUNE = "tiny-llama-chat", "tiny-llama-traffic", "tiny-llama-sft"
#: what hack/flywheel_client.py puts into its prompts, and what must never be stored
PII = ["jane.roe@example.com", "867-5309", "4111 1111 1111 1111", "ORD-123456"]
CORRECTION = "Once upon a time there was a small fox who lived by the river."


def condition(c: Cluster, ns: str, kind: str, name: str, type_: str) -> dict[str, Any]:
    conds = kubectl_json(c, "get", kind, name, "-n", ns).get("status", {}).get("conditions", [])
    return next((x for x in conds if x["type"] == type_), {})


def client(c: Cluster, base: str, *args: str) -> dict[str, Any]:
    """hack/flywheel_client.py in real node 0's network namespace; its summary line."""
    out = subprocess.run(["ip", "netns", "exec", c.nodes.net.netns(0), sys.executable,
                          str(REPO / "hack/flywheel_client.py"), "--base", base, *args],
                         capture_output=True, text=True, timeout=900)
    assert out.stdout.strip(), out.stderr
    summary: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0 and summary["failed"] == 0 and summary["feedback_failed"] == 0, summary
    return summary


class Objects:
    """The cluster's MinIO bucket under an s3:// URI."""

    def __init__(self, c: Cluster, uri: str) -> None:
        s3 = c.s3_settings()
        self.bucket, _, self.prefix = uri.removeprefix("s3://").partition("/")
        self.client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], region_name="us-east-1",
                                   aws_access_key_id=s3["AWS_ACCESS_KEY_ID"],
                                   aws_secret_access_key=s3["AWS_SECRET_ACCESS_KEY"])

    def keys(self, under: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/{under}")
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def get(self, key: str) -> bytes:
        body: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return body

    def committed(self, kind: str) -> int:
        """Records in the committed shards of ``kind`` (requests, feedback)."""
        return sum(json.loads(self.get(k))["records"] for k in self.keys(f"{kind}/") if k.endswith(".commit.json"))

    def members(self, key: str) -> Iterator[dict[str, Any]]:
        with tarfile.open(fileobj=io.BytesIO(self.get(key))) as tar:
            for m in tar:
                f = tar.extractfile(m)
                assert f is not None, m.name
                yield json.loads(f.read())


def server_pods(c: Cluster, ns: str) -> list[dict[str, Any]]:
    pods = kubectl_json(c, "get", "pods", "-n", ns, "-l", f"kubeforge.dev/inferenceservice={SERVICE}")["items"]
    return [p for p in pods if p.get("metadata", {}).get("deletionTimestamp") is None
            and any(x["type"] == "Ready" and x["status"] == "True" for x in p.get("status", {}).get("conditions", []))]


def test_served_traffic_and_feedback_become_a_curated_dataset_a_fine_tune_and_a_drift_reading(
        chart_operator: ChartOperator) -> None:
    op = chart_operator
    c, ns = op.cluster, op.namespace
    t0 = time.monotonic()
    # examples/01-02 as they are (the demo's model: its answers pass curation's quality filters
    # often enough), on a fresh prefix
    s3_secret(c, ns)
    policy = yaml.safe_load((REPO / "examples/01-checkpointpolicy.yaml").read_text())
    policy["spec"]["storage"]["s3"]["prefix"] = f"realpods-fw-{uuid.uuid4().hex[:6]}"
    job = yaml.safe_load((REPO / "examples/02-trainingjob-tiny.yaml").read_text())
    c.kubectl("apply", "-n", ns, "-f", "-", input="\n---\n".join(json.dumps(d) for d in (policy, job)))
    wait_succeeded(c, op, ns, 900)
    c.kubectl("apply", "-n", ns, "-f", str(REPO / "examples/05-inferenceservice-capture.yaml"))
    try:
        wait_for("the capturing InferenceService Ready", is_(lambda: condition(
            c, ns, "inferenceservice", SERVICE, "Ready").get("status") == "True"), 300, interval=3)
        wait_for("both server replicas Ready", lambda: len(server_pods(c, ns)) == 2, 300, interval=3)
    except AssertionError as e:
        raise AssertionError(f"{kubectl_json(c, 'get', 'inferenceservice', SERVICE, '-n', ns).get('status')}\n"
                             f"operator:\n{op.logs()}") from e
    assert condition(c, ns, "inferenceservice", SERVICE, "CaptureReady")["status"] == "True"
    capture = Objects(c, kubectl_json(c, "get", "inferenceservice", SERVICE, "-n", ns)["status"]["capture"]["uri"])
    serve_s = time.monotonic() - t0

    # a rating reaches the replica that did not serve the completion
    a, b = (p["status"]["podIP"] for p in server_pods(c, ns))
    codes = json.loads(in_node(c, f"""
import json, urllib.error, urllib.request
def post(ip, path, body):
    req = urllib.request.Request(f"http://{{ip}}:8000{{path}}", data=json.dumps(body).encode(),
                                 headers={{"content-type": "application/json"}})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{{}}")
status, answer = post("{a}", "/v1/chat/completions",
                      {{"messages": [{{"role": "user", "content": "Once upon a time"}}], "max_tokens": 8}})
print(json.dumps({{"chat": status,
                  "other_replica": post("{b}", "/v1/feedback", {{"id": answer["id"], "rating": -1}})[0],
                  "unknown": post("{b}", "/v1/feedback", {{"id": "chatcmpl-unknown", "rating": 1}})[0],
                  "bad_rating": post("{b}", "/v1/feedback", {{"id": answer["id"], "rating": 7}})[0]}}))
"""))
    assert codes == {"chat": 200, "other_replica": 200, "unknown": 404, "bad_rating": 422}, codes

    cluster_ip = kubectl_json(c, "get", "service", f"{SERVICE}-server", "-n", ns)["spec"]["clusterIP"]
    base = f"http://{cluster_ip}:8000"
    user = client(c, base, "--phase", "normal", "--prompts", "60")
    assert user["requests"] == 180, user
    liked = user["feedback"]["+1"]
    assert liked == user["story_answers"] and liked % 3 == 0 and liked > 0, user
    # every record committed within shardSeconds, redacted
    wait_for("181 request and 181 feedback records committed", lambda: capture.committed("requests") >= 181
             and capture.committed("feedback") >= 181, 180, interval=5)
    # both replicas served the user's traffic (the Service spreads it) and committed shards
    metrics = [in_node(c, f"import urllib.request; print(urllib.request.urlopen('http://{ip}:8000/metrics').read().decode())")
               for ip in (a, b)]
    served = [sum(float(ln.split()[-1]) for ln in m.splitlines()
                  if ln.startswith("kubeforge:capture_records_total") and 'kind="requests"' in ln) for m in metrics]
    assert served[0] > 1 and served[1] > 0, served  # a also committed the probe's request above
    redacted: set[str] = set()
    for key in capture.keys("requests/"):
        if key.endswith(".tar"):
            raw = capture.get(key).decode(errors="replace")
            assert not [p for p in PII if p in raw], (key, [p for p in PII if p in raw])
            for rec in capture.members(key):
                redacted |= set(rec.get("redacted") or {})
    assert {"EMAIL", "PHONE", "CREDIT_CARD", "ORDER_ID"} <= redacted, redacted

    # the Dataset: curated by a real pod; its counts follow from what the user sent and liked
    c.kubectl("apply", "-n", ns, "-f", str(REPO / "examples/06-dataset.yaml"))
    try:
        wait_for("the Dataset Ready", is_(lambda: condition(c, ns, "dataset", DATASET, "Ready").get("status") == "True"),
                 420, interval=3)
    except AssertionError as e:
        raise AssertionError(f"{kubectl_json(c, 'get', 'dataset', DATASET, '-n', ns).get('status')}\n"
                             f"operator:\n{op.logs()}") from e
    ds = kubectl_json(c, "get", "dataset", DATASET, "-n", ns)["status"]
    version = Objects(c, ds["newestUri"])
    manifest = json.loads(version.get(f"{version.prefix}/manifest.json"))
    steps = {f["name"]: (f["records_in"], f["records_out"]) for f in manifest["filters"]}
    print("curation:", json.dumps(steps), "records", manifest["records"], "dedup", manifest["dedup_ratio"])
    assert steps["records"] == (181, 181), steps
    assert steps["feedback"] == (181, liked), steps  # the cross-replica rating was -1
    # each liked prompt was sent twice (greedy: the same answer) and once with its first letter's
    # case changed; the quality filters drop some of the tiny model's answers, never both of a pair
    exact_in, exact_out = steps["exact_dedup"]
    near_in, near_out = steps["near_dedup"]
    assert exact_in == steps["script"][1] and exact_out < exact_in and near_in == exact_out, steps
    assert 0 < near_out < near_in, steps
    assert sum(manifest["records"].values()) == near_out == sum(ds["records"].values())
    records = [r for split in ("train", "eval") if f"{version.prefix}/{split}.tar" in version.keys("")
               for r in version.members(f"{version.prefix}/{split}.tar")]
    assert len(records) == near_out
    stories = [ln.strip().lower()[:40] for i, p in enumerate(sorted((REPO / "trainer_image/kubeforge_runtime/data/corpus")
                                                                    .glob("*.txt"))) if i % 2 == 0
               for ln in p.read_text().splitlines() if ln.strip()]
    for r in records:
        text = r["messages"][-1]["content"].lower()
        assert any(text.startswith(s) for s in stories), f"a record the user did not like: {r}"
        assert not [p for p in PII if p in json.dumps(r)], r
    assert any(r["corrected"] and r["target"] == CORRECTION for r in records) == (user["corrections"] > 0), user
    curate_s = time.monotonic() - t0 - serve_s

    # a fine-tune of the served export on the Dataset, on a real pod
    c.kubectl("apply", "-n", ns, "-f", str(REPO / "examples/07-trainingjob-finetune.yaml"))

    def tuned() -> bool:
        st = job_status(c, ns, FINETUNE)
        if st.get("phase") == "Failed":
            raise AssertionError(f"the fine-tune failed: {json.dumps(st)[:3000]}\noperator:\n{op.logs()}")
        return st.get("phase") == "Succeeded"

    wait_for("the fine-tune Succeeded", is_(tuned), 600, interval=3)
    st = job_status(c, ns, FINETUNE)
    assert st["dataset"] == {"name": DATASET, "version": ds["newestVersion"], "uri": ds["newestUri"]}, st
    assert st["initFrom"]["trainingJob"] == "tiny-llama" and st["initFrom"]["uri"].startswith("s3://"), st
    job = yaml.safe_load((REPO / "examples/07-trainingjob-finetune.yaml").read_text())
    assert st["lastCheckpoint"]["step"] == job["spec"]["trainer"]["config"]["train"]["steps"], st

    # drift: stable on prompts like the training data, detected once the traffic shifts
    def reading() -> dict[str, Any]:
        drift: dict[str, Any] = kubectl_json(c, "get", "inferenceservice", SERVICE, "-n", ns)["status"].get("drift") or {}
        return drift

    wait_for("a drift reading of the user's prompts", lambda: reading().get("prompts", 0) >= 50, 180, interval=5)
    before = condition(c, ns, "inferenceservice", SERVICE, "DriftDetected")
    assert before.get("status") == "False", (before, reading())
    client(c, base, "--phase", "shifted", "--prompts", "240")
    wait_for("DriftDetected True", lambda: condition(c, ns, "inferenceservice", SERVICE, "DriftDetected")
             .get("status") == "True", 240, interval=5)
    print(f"train+serve {serve_s:.0f}s, capture+curate {curate_s:.0f}s, drift before {before}, after {reading()}")

    # one whole Flywheel cycle (examples/10, paced for a test) while a user keeps chatting:
    # a version curated for the cycle, a fine-tune of the served export on it, the evaluation
    # gate, shadow, a canary step, promotion; no request of the user fails
    fw = yaml.safe_load((REPO / "examples/10-flywheel.yaml").read_text())
    spec = fw["spec"]
    spec["trigger"] = {}
    spec["evaluation"] = {"maxRecords": 40, "maxNewTokens": 16, "gate": {"eval.mean_logprob": {"minGain": 0.0}}}
    spec["rollout"] = {"shadow": {"samplePercent": 100, "minSeconds": 20, "minRequests": 10},
                       "canarySteps": [{"trafficPercent": 50, "minSeconds": 20, "minRequests": 10}],
                       "guardRails": {"maxErrorRateIncrease": 0.05, "maxP95LatencyRatio": 4, "minRequests": 10}}
    name = fw["metadata"]["name"]
    stop = f"/tmp/kubeforge-chat-{uuid.uuid4().hex[:8]}"
    user_loop = subprocess.Popen(["ip", "netns", "exec", c.nodes.net.netns(0), sys.executable, "-c", f"""
import json, os, time, urllib.error, urllib.request
codes = {{}}
while not os.path.exists({stop!r}):
    req = urllib.request.Request("{base}/v1/completions", headers={{"content-type": "application/json"}},
                                 data=json.dumps({{"prompt": "Once upon a time", "max_tokens": 8}}).encode())
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            code = r.status
    except urllib.error.HTTPError as e:
        code = e.code
    except OSError as e:
        code = type(e).__name__
    codes[str(code)] = codes.get(str(code), 0) + 1
    time.sleep(0.2)
print(json.dumps(codes))
"""], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t_cycle = time.monotonic()
        c.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(fw))
        c.kubectl("annotate", "flywheel", name, "-n", ns, "kubeforge.dev/run-cycle=1")

        def cycle() -> dict[str, Any] | None:
            st = kubectl_json(c, "get", "flywheel", name, "-n", ns).get("status") or {}
            rec = (st.get("cycles") or [{}])[-1]
            if rec.get("outcome") and rec["outcome"] != "Promoted":
                raise AssertionError(f"the cycle ended {rec['outcome']}: {json.dumps(st)[:3000]}\n"
                                     f"operator:\n{op.logs()}")
            return rec if rec.get("outcome") == "Promoted" and st.get("stage") == "Idle" else None

        try:
            record = wait_for("the cycle Promoted", is_(cycle), 1200, interval=5)
        except AssertionError as e:
            st = kubectl_json(c, "get", "flywheel", name, "-n", ns).get("status")
            raise AssertionError(f"{e}\n{json.dumps(st)[:3000]}\noperator:\n{op.logs()}") from e
        cycle_s = time.monotonic() - t_cycle
    finally:
        open(stop, "w").close()
        out, err = user_loop.communicate(timeout=180)
        os.unlink(stop)
    codes = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    assert set(codes) == {"200"} and codes["200"] > 20, (codes, err[-2000:])
    job = f"{name}-c1"
    assert record["trainingJob"] == job and record["gatePassed"] is True, record
    # the newest version when the cycle began, or one curated for it (the Dataset's store reading
    # may not count the shifted traffic yet), and the one the candidate trained on
    assert record["datasetVersion"] >= ds["newestVersion"], (record, ds)
    assert job_status(c, ns, f"{name}-c1")["dataset"]["version"] == record["datasetVersion"], record
    assert record["scores"]["eval.mean_logprob"] >= record["baselineScores"]["eval.mean_logprob"], record
    served = kubectl_json(c, "get", "inferenceservice", SERVICE, "-n", ns)
    assert served["spec"]["model"]["trainingJobRef"] == {"name": job}, served["spec"]
    assert "canary" not in served["spec"] and "shadow" not in served["spec"], served["spec"]
    assert served["status"]["model"]["uri"] == job_status(c, ns, job)["exportUri"] == record["candidateUri"]
    reasons = {e["reason"] for e in kubectl_json(c, "get", "events", "-n", ns, "--field-selector",
                                                 f"involvedObject.name={name}")["items"]}
    assert {"CycleStarted", "TrainingStarted", "EvaluationStarted", "ShadowStarted", "CanaryStep", "StepPassed",
            "Promoting", "Promoted"} <= reasons, reasons
    print(f"flywheel cycle {cycle_s:.0f}s: {json.dumps(record)}; user requests {codes}")
