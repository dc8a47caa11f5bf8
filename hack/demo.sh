#!/usr/bin/env bash
# `make demo`: the whole loop on real pods of the local cluster (hack/cluster/nodes.py).
#  1. our images, built here with podman and imported into the real nodes (cached);
#  2. `helm install charts/kubeforge` with those images: the operator runs as a pod;
#  3. examples/01..03 in a PodSecurity-restricted namespace whose pods go to the real nodes:
#     the TrainingJob trains the tiny model in two worker pods (rendezvous over cluster DNS,
#     checkpoints and the export to MinIO), then its InferenceService serves the export;
#  4. the export copied to s3://kubeforge/models/tiny-llama, then examples/04 serves it;
#  5. an OpenAI chat completion through the Service (kubectl port-forward), a few vllm:
#     metrics, `kubectl get kubeforge` and the time of each phase.
# The port-forward is stopped by its pid when the demo ends; `make cluster-down` stops the
# cluster (and with it the operator and the workloads).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=hack/demo-common.sh
source hack/demo-common.sh

echo "== examples/01..03: the policy, the TrainingJob and the service that follows its export"
for f in examples/01-*.yaml examples/02-*.yaml examples/03-*.yaml; do $KUBECTL apply -n "$NS" -f "$f"; done
$KUBECTL wait -n "$NS" checkpointpolicy/every-50-steps --for=condition=Ready --timeout=120s >/dev/null
$KUBECTL wait -n "$NS" trainingjob/tiny-llama --for=jsonpath='{.status.phase}'=Running --timeout=300s >/dev/null
$KUBECTL get pods -n "$NS" -o wide
phase "apply to Running"

echo "== training (the workers' logs: kubectl logs -n $NS tiny-llama-worker-0)"
deadline=$((SECONDS + 600))
while :; do
  phase_now=$($KUBECTL get -n "$NS" trainingjob/tiny-llama -o jsonpath='{.status.phase}')
  step=$($KUBECTL get -n "$NS" trainingjob/tiny-llama -o jsonpath='{.status.lastCheckpoint.step}')
  printf '   %4ss  phase %-10s last checkpoint step %s\n' $((SECONDS - t_phase)) "$phase_now" "${step:--}"
  [ "$phase_now" = Succeeded ] && break
  if [ "$phase_now" = Failed ] || [ $SECONDS -gt $deadline ]; then
    $KUBECTL get -n "$NS" trainingjob/tiny-llama -o yaml | sed -n '/^status:/,$p'
    $KUBECTL logs -n "$NS" tiny-llama-worker-0 --tail=30 || true
    echo "demo: the TrainingJob did not succeed" >&2
    exit 1
  fi
  sleep 10
done
phase "train"

$KUBECTL wait -n "$NS" inferenceservice/tiny-llama --for=condition=Ready --timeout=300s >/dev/null
phase "export to Ready"

echo "== examples/04: the export copied to s3://kubeforge/models/tiny-llama, then served from there"
export_uri=$($KUBECTL get -n "$NS" trainingjob/tiny-llama -o jsonpath='{.status.exportUri}')
$PY - "$export_uri" <<'EOF'
import os, sys
import boto3
src = sys.argv[1].removeprefix("s3://")
bucket, _, prefix = src.partition("/")
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
        for o in page.get("Contents", [])]
for key in keys:
    s3.copy_object(Bucket="kubeforge", Key="models/tiny-llama/" + key[len(prefix.rstrip("/")) + 1:],
                   CopySource={"Bucket": bucket, "Key": key})
print(f"   copied {len(keys)} objects")
EOF
$KUBECTL apply -n "$NS" -f examples/04-inferenceservice-s3.yaml
$KUBECTL wait -n "$NS" inferenceservice/llama-s3 --for=condition=Ready --timeout=300s >/dev/null
phase "s3 model to Ready"

echo "== an OpenAI chat completion through the Service tiny-llama-server"
port=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
$KUBECTL port-forward -n "$NS" svc/tiny-llama-server "$port:8000" >.dev/demo-port-forward.log 2>&1 &
pf_pid=$!
trap 'kill $pf_pid 2>/dev/null; wait $pf_pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"model": "tiny-llama", "messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 48}' \
  | $PY -c 'import json, sys; r = json.load(sys.stdin); print("   answer:", repr(r["choices"][0]["message"]["content"])); print("   usage:", r["usage"])'
curl -sf "http://127.0.0.1:$port/metrics" | grep -E '^vllm:(num_requests_running|num_requests_waiting|prompt_tokens_total|generation_tokens_total|time_to_first_token_seconds_count)' | sed 's/^/   /'
phase "first answer"

echo
$KUBECTL get kubeforge -n "$NS"
echo
$KUBECTL get nodes -L type,nvidia.com/gpu.product
echo
echo "phases:"
printf '  %s\n' "${phases[@]}"
echo "demo finished in $((SECONDS - t_demo))s; the cluster keeps running: KUBECONFIG=$KUBECONFIG, stop it with 'make cluster-down'"
