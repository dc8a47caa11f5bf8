# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables are for the script that sources this file
# Sourced by hack/demo.sh and hack/demo-flywheel.sh: the tools, the phase clock, our images, the
# chart installed with them (the operator as a pod), and the MinIO Secret in the demo namespace.
# Sets KUBECTL, HELM, PY, NS, SYSTEM_NS, operator_image, trainer_image and the AWS_* of the local MinIO.
export KUBECONFIG=$PWD/.dev/cluster/kubeconfig
PY=.venv/bin/python
tool() { $PY -c "import sys; sys.path.insert(0, 'hack/cluster'); import tools; print(tools.binary('$1'))"; }
KUBECTL=$(tool kubectl)
HELM=$(tool helm)
NS=${KUBEFORGE_DEMO_NAMESPACE:-kubeforge-demo}
SYSTEM_NS=kubeforge-system
declare -a phases=()
t_demo=$SECONDS
t_phase=$SECONDS
phase() { # $1 name: closes the running phase
  phases+=("$(printf '%-26s %4ss' "$1" $((SECONDS - t_phase)))")
  t_phase=$SECONDS
}
why=$($PY hack/cluster/devcluster.py status 2>/dev/null | sed -n 's/^real nodes: none //p')
if [ -n "$why" ]; then
  echo "demo: the local cluster has no real nodes $why" >&2
  exit 1
fi

echo "== images (built once, then cached by a hash of their inputs)"
tags=$($PY hack/cluster/devcluster.py images)
operator_image=$(sed -n 's/^operator=//p' <<<"$tags")
trainer_image=$(sed -n 's/^trainer=//p' <<<"$tags")
phase images

echo "== helm install charts/kubeforge (operator $operator_image)"
# the CRDs first: helm installs a chart's CRDs only when they are missing, never upgrades them
$KUBECTL apply --server-side --force-conflicts -f crds/ >/dev/null
real_namespace() { # $1: PodSecurity restricted, pods on the real nodes (PodNodeSelector)
  $KUBECTL get namespace "$1" >/dev/null 2>&1 || $KUBECTL create namespace "$1" >/dev/null
  $KUBECTL label namespace "$1" pod-security.kubernetes.io/enforce=restricted --overwrite >/dev/null
  $KUBECTL annotate namespace "$1" scheduler.alpha.kubernetes.io/node-selector=type=real --overwrite >/dev/null
}
real_namespace "$SYSTEM_NS"
# the workload namespace first: the chart binds its Secret reader there (rbac.secretNamespaces)
real_namespace "$NS"
$HELM upgrade --install kubeforge charts/kubeforge --namespace "$SYSTEM_NS" --wait --timeout 180s \
  --set image.repository="${operator_image%:*}" --set image.tag="${operator_image##*:}" \
  --set workloadImage.repository="${trainer_image%:*}" --set workloadImage.tag="${trainer_image##*:}" \
  --set "rbac.secretNamespaces={$NS}" -f hack/cluster/local-values.yaml \
  -f .dev/cluster/nodes/chart-values.yaml >/dev/null
$KUBECTL get pods -n "$SYSTEM_NS" -l app.kubernetes.io/name=kubeforge -o wide
phase "helm install"

# the local MinIO's credentials, as the Secret the examples reference (the endpoint is the
# examples' own: minio.kubeforge-local.svc, a cluster DNS name)
set -a
# shellcheck source=/dev/null
source .dev/cluster/s3.env
set +a
$KUBECTL create secret generic kubeforge-s3 -n "$NS" --from-literal=AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" \
  --from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" --dry-run=client -o yaml | $KUBECTL apply -f - >/dev/null
