#!/usr/bin/env bash
# Removes what hack/kind-up.sh made: the kind cluster and the host's MinIO (stopped by its pid).
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${KUBEFORGE_KIND_CLUSTER:-kubeforge}
STATE=.dev/kind
KIND=$(python3 -c 'import sys; sys.path.insert(0, "hack/cluster"); import tools; print(tools.binary("kind"))')

if "$KIND" get clusters | grep -qx "$CLUSTER"; then
  "$KIND" delete cluster --name "$CLUSTER" --kubeconfig "$PWD/$STATE/kubeconfig"
fi
if [ -f "$STATE/minio.pid" ]; then
  pid=$(cat "$STATE/minio.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
  fi
  rm -f "$STATE/minio.pid"
fi
echo "kind cluster '$CLUSTER' and its MinIO removed (data kept in $STATE/minio)"
