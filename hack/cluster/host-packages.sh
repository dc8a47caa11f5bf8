#!/usr/bin/env bash
# Installs the host packages the real nodes and the image builds need, when missing:
# runc, the CNI plugins, iptables, conntrack, ipset (kube-router's), podman (with its OCI runtime)
# and debootstrap.
# Debian's packages; a no-op when every command is already there.
set -euo pipefail
declare -A pkg_of=(
  [runc]=runc [iptables]=iptables [conntrack]=conntrack [ipset]=ipset [podman]=podman
  [debootstrap]=debootstrap [/usr/lib/cni/bridge]=containernetworking-plugins
  [ip]=iproute2 [mount.fuse3]=fuse3 [fuse-overlayfs]=fuse-overlayfs
)
missing=()
for cmd in "${!pkg_of[@]}"; do
  if [[ $cmd == /* ]]; then [ -e "$cmd" ] || missing+=("${pkg_of[$cmd]}")
  else command -v "$cmd" >/dev/null 2>&1 || missing+=("${pkg_of[$cmd]}"); fi
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "host-packages: missing ${missing[*]}; install them as root (apt-get install ${missing[*]})" >&2
  exit 1
fi
t0=$SECONDS
echo ">> installing host packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo ">> host packages installed in $((SECONDS - t0))s" >&2
