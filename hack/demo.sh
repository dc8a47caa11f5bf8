#!/usr/bin/env bash
# `make demo`: on the running local cluster, install the CRDs, run the operator, apply
# examples/ into a PodSecurity-restricted namespace and show what the operator made of them.
# The operator is stopped (by its pid) when the demo ends; `make cluster-down` stops the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
export KUBECONFIG=$PWD/.dev/cluster/kubeconfig
KUBECTL=$(.venv/bin/python -c 'import sys; sys.path.insert(0, "hack/cluster"); import tools; print(tools.binary("kubectl"))')
NS=${KUBEFORGE_DEMO_NAMESPACE:-kubeforge-demo}
t0=$SECONDS

$KUBECTL apply --server-side --force-conflicts -f crds/ >/dev/null
$KUBECTL wait --for=condition=Established --timeout=60s -f crds/ >/dev/null
$KUBECTL get namespace "$NS" >/dev/null 2>&1 || $KUBECTL create namespace "$NS" >/dev/null
$KUBECTL label namespace "$NS" pod-security.kubernetes.io/enforce=restricted --overwrite >/dev/null
# the local MinIO's credentials, as the Secret the examples reference
$KUBECTL create secret generic kubeforge-s3 -n "$NS" --from-env-file=.dev/cluster/s3.env \
  --dry-run=client -o yaml | $KUBECTL apply -f - >/dev/null

mkdir -p .dev
.venv/bin/kubeforge-operator --bind-address 127.0.0.1 --log-format plain --namespace "$NS" \
  >.dev/demo-operator.log 2>&1 &
op_pid=$!
trap 'kill $op_pid 2>/dev/null; wait $op_pid 2>/dev/null || true' EXIT
echo "operator running (pid $op_pid, log .dev/demo-operator.log)"

# the examples name the default local MinIO; point them at this cluster's (KUBEFORGE_CLUSTER_PORT_BASE)
endpoint=$(sed -n 's/^AWS_ENDPOINT_URL=//p' .dev/cluster/s3.env)
for f in examples/*.yaml; do
  sed "s#http://127.0.0.1:26900#$endpoint#" "$f" | $KUBECTL apply -n "$NS" -f -
done
echo "waiting for the operator to report on every resource..."
for kind in trainingjobs checkpointpolicies inferenceservices; do
  for name in $($KUBECTL get "$kind.kubeforge.dev" -n "$NS" -o name); do
    $KUBECTL wait -n "$NS" "$name" --for=jsonpath='{.status.observedGeneration}'="$($KUBECTL get -n "$NS" "$name" -o jsonpath='{.metadata.generation}')" --timeout=60s >/dev/null
  done
done
echo "waiting for the storage check, the training workers and the S3-backed server..."
$KUBECTL wait -n "$NS" checkpointpolicy.kubeforge.dev/every-50-steps --for=condition=Ready --timeout=60s >/dev/null
$KUBECTL wait -n "$NS" trainingjob.kubeforge.dev/tiny-llama --for=jsonpath='{.status.phase}'=Running --timeout=120s >/dev/null
$KUBECTL wait -n "$NS" inferenceservice.kubeforge.dev/llama-s3 --for=condition=Ready --timeout=120s >/dev/null
echo
$KUBECTL get kubeforge -n "$NS"
echo
$KUBECTL get nodes -L nvidia.com/gpu.product
echo "demo finished in $((SECONDS - t0))s; the cluster keeps running: KUBECONFIG=$KUBECONFIG, stop it with 'make cluster-down'"
