#!/usr/bin/env bash
# A kubeforge cluster on Docker with kind (for laptops; the no-Docker path is `make demo`):
#   1. kind, helm and kubectl built from their Go modules (hack/cluster, cached like every tool),
#   2. a kind cluster whose GPU node gets fake nvidia.com/gpu capacity, the GPU Operator's
#      labels and its taint, so GPU-requesting pods schedule (they run on the CPU),
#   3. the operator and the CPU workload image built and loaded into the nodes,
#   4. MinIO (built from its Go module) on the host as the examples' S3,
#   5. the chart installed, the examples applied with the CPU image, and waited for.
# Undo with hack/kind-down.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${KUBEFORGE_KIND_CLUSTER:-kubeforge}
NS=${KUBEFORGE_KIND_NAMESPACE:-kubeforge-demo}
VERSION=$(sed -n 's/^appVersion: *"\(.*\)"/\1/p' charts/kubeforge/Chart.yaml)
OPERATOR_IMAGE=ghcr.io/kubeforge/operator:$VERSION
WORKLOAD_IMAGE=ghcr.io/kubeforge/trainer:$VERSION-cpu
GPU_PRODUCT=NVIDIA-H100-80GB-HBM3
GPUS=8
S3_PORT=26900
STATE=.dev/kind
PY=.venv/bin/python

tool() { python3 -c 'import sys; sys.path.insert(0, "hack/cluster"); import tools; print(tools.binary(sys.argv[1]))' "$1"; }

command -v docker >/dev/null || { echo "kind needs Docker; without it use 'make demo' (docs/install.md)" >&2; exit 1; }
[ -x "$PY" ] || make install
KIND=$(tool kind)
HELM=$(tool helm)
KUBECTL=$(tool kubectl)
MINIO=$(tool minio)
mkdir -p "$STATE"
export KUBECONFIG=$PWD/$STATE/kubeconfig

# 1-2. the cluster: a control plane, a CPU worker and a GPU worker
if ! "$KIND" get clusters | grep -qx "$CLUSTER"; then
  cat >"$STATE/kind.yaml" <<YAML
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
  - role: worker
    labels:
      nvidia.com/gpu.present: "true"
      nvidia.com/gpu.product: $GPU_PRODUCT
      nvidia.com/gpu.count: "$GPUS"
YAML
  "$KIND" create cluster --name "$CLUSTER" --config "$STATE/kind.yaml" --kubeconfig "$KUBECONFIG" --wait 120s
fi
GPU_NODE=$("$KUBECTL" get nodes -l nvidia.com/gpu.present=true -o jsonpath='{.items[0].metadata.name}')
# what the GPU Operator's device plugin would advertise; the kubelet keeps extended resources it
# does not manage
"$KUBECTL" patch node "$GPU_NODE" --subresource=status --type=json \
  -p "[{\"op\": \"add\", \"path\": \"/status/capacity/nvidia.com~1gpu\", \"value\": \"$GPUS\"}]"
"$KUBECTL" taint node "$GPU_NODE" nvidia.com/gpu=present:NoSchedule --overwrite

# 3. images
docker build -f operator/Dockerfile -t "$OPERATOR_IMAGE" .
docker build -f trainer_image/Dockerfile.cpu -t "$WORKLOAD_IMAGE" .
"$KIND" load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$WORKLOAD_IMAGE"

# 4. S3 on the host, reachable from the nodes through the kind network's gateway
GATEWAY=$(docker network inspect kind -f '{{range .IPAM.Config}}{{if .Gateway}}{{.Gateway}} {{end}}{{end}}' | tr ' ' '\n' | grep -m1 '\.')
S3_ENDPOINT=http://$GATEWAY:$S3_PORT
if [ ! -f "$STATE/minio.pid" ] || ! kill -0 "$(cat "$STATE/minio.pid")" 2>/dev/null; then
  mkdir -p "$STATE/minio"
  MINIO_ROOT_USER=kubeforge MINIO_ROOT_PASSWORD=kubeforge-secret MINIO_BROWSER=off \
    nohup "$MINIO" server "$STATE/minio" --address "$GATEWAY:$S3_PORT" --quiet >"$STATE/minio.log" 2>&1 &
  echo $! >"$STATE/minio.pid"
fi
"$PY" - "$S3_ENDPOINT" <<'PYEOF'
import sys, time
import boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="kubeforge", aws_secret_access_key="kubeforge-secret")
for _ in range(60):
    try:
        if "kubeforge" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
            s3.create_bucket(Bucket="kubeforge")
        break
    except Exception:
        time.sleep(1)
else:
    sys.exit("MinIO did not start: see .dev/kind/minio.log")
PYEOF

# 5. the namespace (the chart binds its Secret reader there), the chart (its crds/ first), the
# credentials and the examples
"$KUBECTL" get namespace "$NS" >/dev/null 2>&1 || "$KUBECTL" create namespace "$NS"
"$HELM" upgrade --install kubeforge charts/kubeforge -n kubeforge-system --create-namespace \
  --set image.repository="${OPERATOR_IMAGE%:*}" --set image.tag="$VERSION" --set image.pullPolicy=Never \
  --set workloadImage.repository="${WORKLOAD_IMAGE%:*}" --set workloadImage.tag="$VERSION-cpu" \
  --set "rbac.secretNamespaces={$NS}" --wait --timeout 5m
"$KUBECTL" label namespace "$NS" pod-security.kubernetes.io/enforce=restricted --overwrite
"$KUBECTL" create secret generic kubeforge-s3 -n "$NS" \
  --from-literal=AWS_ACCESS_KEY_ID=kubeforge --from-literal=AWS_SECRET_ACCESS_KEY=kubeforge-secret \
  --dry-run=client -o yaml | "$KUBECTL" apply -f -
"$PY" - "$WORKLOAD_IMAGE" "$S3_ENDPOINT" examples/*.yaml >"$STATE/examples.yaml" <<'PYEOF'
import sys
import yaml
image, endpoint, files = sys.argv[1], sys.argv[2], sys.argv[3:]
docs = []
for path in files:
    for doc in yaml.safe_load_all(open(path)):
        spec = doc["spec"]
        if doc["kind"] == "TrainingJob":
            spec.setdefault("trainer", {})["image"] = image
            spec["trainer"]["imagePullPolicy"] = "Never"
        if doc["kind"] == "InferenceService":
            spec["image"], spec["imagePullPolicy"] = image, "Never"
            if "s3Endpoint" in spec["model"]:
                spec["model"]["s3Endpoint"] = endpoint
        if doc["kind"] == "Dataset":
            spec["image"], spec["imagePullPolicy"] = image, "Never"
            if "s3Endpoint" in spec["source"].get("store", {}):
                spec["source"]["store"]["s3Endpoint"] = endpoint
        if doc["kind"] == "Flywheel":
            trainer = spec["training"]["template"].setdefault("trainer", {})
            trainer["image"], trainer["imagePullPolicy"] = image, "Never"
            spec.setdefault("evaluation", {})["image"] = image
        if doc["kind"] == "CheckpointPolicy" and "s3" in spec["storage"]:
            spec["storage"]["s3"]["endpoint"] = endpoint
        docs.append(doc)
yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)
PYEOF
"$KUBECTL" apply -n "$NS" -f "$STATE/examples.yaml"

echo "waiting for the examples (training runs on the CPU: minutes)..."
"$KUBECTL" wait -n "$NS" checkpointpolicy.kubeforge.dev/every-50-steps --for=condition=Ready --timeout=5m
"$KUBECTL" wait -n "$NS" trainingjob.kubeforge.dev/tiny-llama --for=condition=Succeeded --timeout=60m
"$KUBECTL" wait -n "$NS" inferenceservice.kubeforge.dev/tiny-llama --for=condition=Ready --timeout=20m
"$KUBECTL" get kubeforge -n "$NS"
echo "kind cluster '$CLUSTER' is up: KUBECONFIG=$KUBECONFIG; remove it with hack/kind-down.sh"
