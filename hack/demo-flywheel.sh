#!/usr/bin/env bash
# `make demo-flywheel`: the data half of the flywheel on real pods of the local cluster
# (docs/flywheel.md):
#  1. as `make demo`: our images, the chart, examples/01-02 (the tiny model trained and
#     exported; reused when it already succeeded);
#  2. examples/05: two server replicas of that export capturing every request, redacted, into
#     MinIO, and profiling the prompts;
#  3. a scripted user (hack/flywheel_client.py) chats with known preferences and rates the
#     answers through POST /v1/feedback, alternating between the two replicas and rating each
#     answer on the replica that did not serve it;
#  4. the captured shards and a record, as stored;
#  5. examples/06: the Dataset curated by a pod: counts per filter, dedup ratio, splits;
#  6. examples/07: a fine-tune of the served export on that Dataset (SFT);
#  7. drift: PSI of the live prompts against the export's training data, before and after the
#     user's traffic shifts to prompts of another kind.
# The port-forwards are stopped by their pids when the demo ends; `make cluster-down` stops the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=hack/demo-common.sh
source hack/demo-common.sh
jsonpath() { $KUBECTL get -n "$NS" "$1" -o jsonpath="$2"; }

echo "== examples/01-02: the policy and the tiny model, trained and exported"
for f in examples/01-*.yaml examples/02-*.yaml; do $KUBECTL apply -n "$NS" -f "$f" >/dev/null; done
deadline=$((SECONDS + 900))
until [ "$(jsonpath trainingjob/tiny-llama '{.status.phase}')" = Succeeded ] && \
      [ -n "$(jsonpath trainingjob/tiny-llama '{.status.exportUri}')" ]; do
  if [ "$(jsonpath trainingjob/tiny-llama '{.status.phase}')" = Failed ] || [ $SECONDS -gt $deadline ]; then
    $KUBECTL get -n "$NS" trainingjob/tiny-llama -o yaml | sed -n '/^status:/,$p'
    echo "demo-flywheel: the TrainingJob tiny-llama did not succeed" >&2
    exit 1
  fi
  sleep 5
done
echo "   export: $(jsonpath trainingjob/tiny-llama '{.status.exportUri}')"
phase "train and export"

echo "== examples/05: serve it with capture, feedback and drift profiles"
$KUBECTL apply -n "$NS" -f examples/05-inferenceservice-capture.yaml
$KUBECTL wait -n "$NS" inferenceservice/tiny-llama-chat --for=condition=Ready --timeout=300s >/dev/null
$KUBECTL rollout status -n "$NS" deployment/tiny-llama-chat-server --timeout=300s >/dev/null
echo "   capture: $(jsonpath inferenceservice/tiny-llama-chat '{.status.capture.uri}')"
phase "capture to Ready"

# one port-forward per replica (a port-forward to the Service reaches one pod only): the user
# alternates between them and rates each answer on the replica that did not serve it
pf_pids=()
bases=()
stop_forwards() {
  local pid
  for pid in "${pf_pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
}
trap stop_forwards EXIT
# the Ready replicas that are not going away (after the rollout: the two of examples/05)
ready=$($KUBECTL get pods -n "$NS" -l kubeforge.dev/inferenceservice=tiny-llama-chat -o json | $PY -c '
import json, sys
for p in json.load(sys.stdin)["items"]:
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions", []))
    if ready and not p["metadata"].get("deletionTimestamp"):
        print(p["metadata"]["name"])')
for pod in $ready; do
  port=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  $KUBECTL port-forward -n "$NS" "pod/$pod" "$port:8000" >".dev/demo-flywheel-port-forward-$pod.log" 2>&1 &
  pf_pids+=($!)
  up=""
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && up=1 && break; sleep 0.2; done
  if [ -z "$up" ]; then
    echo "demo-flywheel: replica $pod does not answer through its port-forward:" >&2
    cat ".dev/demo-flywheel-port-forward-$pod.log" >&2
    exit 1
  fi
  bases+=("http://127.0.0.1:$port")
  echo "   replica $pod on 127.0.0.1:$port"
done
if [ "${#bases[@]}" -lt 2 ]; then
  echo "demo-flywheel: ${#bases[@]} Ready replica(s) of tiny-llama-chat, examples/05 asks for 2" >&2
  exit 1
fi
base=$(IFS=,; echo "${bases[*]}")

echo "== a scripted user: 60 prompts x 3 (two exact repeats, one near duplicate), stories rated +1, summaries -1"
$PY hack/flywheel_client.py --base "$base" --phase normal --prompts 60 | sed 's/^/   /'
phase "traffic and feedback"

echo "== captured shards (committed within spec.logging.shardSeconds)"
capture=$(jsonpath inferenceservice/tiny-llama-chat '{.status.capture.uri}')
$PY - "$capture" <<'EOF'
import io, json, os, sys, tarfile, time
import boto3
bucket, _, prefix = sys.argv[1].removeprefix("s3://").partition("/")
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
def markers(kind):
    return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/{kind}/")
            for o in page.get("Contents", []) if o["Key"].endswith(".commit.json")]
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    counts = {k: sum(json.loads(s3.get_object(Bucket=bucket, Key=m)["Body"].read())["records"] for m in markers(k))
              for k in ("requests", "feedback")}
    if counts["requests"] >= 180 and counts["feedback"] >= 180:
        break
    time.sleep(5)
print(f"   committed: {counts['requests']} request records, {counts['feedback']} feedback records "
      f"in {len(markers('requests'))} + {len(markers('feedback'))} shards")
shard = markers("requests")[0].removesuffix(".commit.json") + ".tar"
with tarfile.open(fileobj=io.BytesIO(s3.get_object(Bucket=bucket, Key=shard)["Body"].read())) as tar:
    for member in tar:
        rec = json.loads(tar.extractfile(member).read())
        if rec.get("redacted"):
            break
print("   a redacted record:", json.dumps({k: rec[k] for k in ("id", "messages", "completion", "redacted",
                                                              "prompt_tokens", "ttft_s")})[:600])
EOF
phase "capture committed"

echo "== examples/06: the Dataset, curated by a pod"
$KUBECTL apply -n "$NS" -f examples/06-dataset.yaml
$KUBECTL wait -n "$NS" dataset/tiny-llama-traffic --for=condition=Ready --timeout=300s >/dev/null
$KUBECTL get -n "$NS" dataset/tiny-llama-traffic
$PY - "$(jsonpath dataset/tiny-llama-traffic '{.status.newestUri}')" <<'EOF'
import json, os, sys
import boto3
bucket, _, prefix = sys.argv[1].removeprefix("s3://").partition("/")
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
m = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")["Body"].read())
print(f"   version {m['version']}: {m['records']} (dedup ratio {m['dedup_ratio']:.2f}), "
      f"window {m['window_start']} .. {m['window_end']}")
for f in m["filters"]:
    print(f"     {f['name']:24} {f['records_in']:5} -> {f['records_out']:5}")
EOF
phase "curated"

echo "== examples/07: fine-tune the served export on the Dataset"
$KUBECTL apply -n "$NS" -f examples/07-trainingjob-finetune.yaml
deadline=$((SECONDS + 600))
until [ "$(jsonpath trainingjob/tiny-llama-sft '{.status.phase}')" = Succeeded ]; do
  if [ "$(jsonpath trainingjob/tiny-llama-sft '{.status.phase}')" = Failed ] || [ $SECONDS -gt $deadline ]; then
    $KUBECTL get -n "$NS" trainingjob/tiny-llama-sft -o yaml | sed -n '/^status:/,$p'
    echo "demo-flywheel: the fine-tune did not succeed" >&2
    exit 1
  fi
  sleep 5
done
echo "   dataset: $(jsonpath trainingjob/tiny-llama-sft '{.status.dataset}')"
echo "   from:    $(jsonpath trainingjob/tiny-llama-sft '{.status.initFrom}')"
phase "fine-tune"

drift() {
  echo "   PSI $(jsonpath inferenceservice/tiny-llama-chat '{.status.drift.psi}') over" \
    "$(jsonpath inferenceservice/tiny-llama-chat '{.status.drift.prompts}') prompts;" \
    "DriftDetected=$(jsonpath inferenceservice/tiny-llama-chat '{.status.conditions[?(@.type=="DriftDetected")].status}')" \
    "($(jsonpath inferenceservice/tiny-llama-chat '{.status.conditions[?(@.type=="DriftDetected")].reason}'))"
}
echo "== drift: the live prompts so far (like the training data)"
drift
echo "== drift: the user's traffic shifts to code-like prompts"
$PY hack/flywheel_client.py --base "$base" --phase shifted --prompts 240 | sed 's/^/   /'
deadline=$((SECONDS + 180))
until [ "$(jsonpath inferenceservice/tiny-llama-chat '{.status.conditions[?(@.type=="DriftDetected")].status}')" = True ]; do
  if [ $SECONDS -gt $deadline ]; then
    drift
    echo "demo-flywheel: DriftDetected did not become True" >&2
    exit 1
  fi
  sleep 5
done
drift
phase "drift detected"

echo
$KUBECTL get kubeforge -n "$NS"
echo
echo "phases:"
printf '  %s\n' "${phases[@]}"
echo "demo-flywheel finished in $((SECONDS - t_demo))s; the cluster keeps running: KUBECONFIG=$KUBECONFIG, stop it with 'make cluster-down'"
