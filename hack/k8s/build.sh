#!/usr/bin/env bash
# Build (or reuse) the pinned local control-plane binaries from Go modules:
#
#   kube-apiserver, kube-controller-manager, kube-scheduler  k8s.io/kubernetes   (hack/k8s/kube)
#   kubectl                                                  k8s.io/kubectl      (hack/k8s/kube)
#   etcd                                                     go.etcd.io/etcd     (hack/k8s/etcd)
#   kwok                                                     sigs.k8s.io/kwok    (hack/k8s/kwok)
#
# With --node, also the binaries of the local real node (docs/local-control-plane.md):
#
#   kubelet, kube-proxy   k8s.io/kubernetes, same version and replace block   (hack/k8s/node)
#   coredns               github.com/coredns/coredns, a minimal plugin set     (hack/k8s/coredns)
#   pause                 the pods' sandbox process, a few lines of Go         (hack/k8s/pause)
#
# Versions are pinned by the go.mod/go.sum files next to this script. The
# binaries land in $K8S_CACHE/<key>/ (key = pinned versions) and
# $K8S_CACHE/current points at that directory. Every binary has a stamp
# (module version + hash of its go.mod/go.sum/sources); a binary is rebuilt
# only when it is missing, its stamp differs, or it does not report the
# expected version, so a second run is a no-op.
#
# Usage: hack/k8s/build.sh [--force] [--print-dir] [--node]
#   --force      rebuild everything
#   --node       also build the real node's binaries (kubelet, kube-proxy, coredns, pause)
#   --print-dir  only print the directory the pinned binaries live in
# Env:   K8S_CACHE (default: .cache/k8s; relative paths are relative to the
#        repository root), GO (default: go).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
K8S_CACHE=${K8S_CACHE:-$ROOT/.cache/k8s}
case $K8S_CACHE in /*) ;; *) K8S_CACHE=$ROOT/$K8S_CACHE ;; esac
GO=${GO:-go}

FORCE=0
PRINT_DIR=0
NODE=0
for arg in "$@"; do
  case $arg in
    --force) FORCE=1 ;;
    --print-dir) PRINT_DIR=1 ;;
    --node) NODE=1 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

log() { echo "[k8s-build] $*" >&2; }

# Version of a required module, read straight from a go.mod (no network).
modver() { # <go.mod> <module path>
  awk -v m="$2" '$1 == m && $2 ~ /^v/ { print $2; exit }
                 $1 == "require" && $2 == m { print $3; exit }' "$1"
}

KUBE_VERSION=$(modver "$HERE/kube/go.mod" k8s.io/kubernetes)
KUBECTL_VERSION=$(modver "$HERE/kube/go.mod" k8s.io/kubectl)
ETCD_VERSION=$(modver "$HERE/etcd/go.mod" go.etcd.io/etcd/server/v3)
KWOK_VERSION=$(modver "$HERE/kwok/go.mod" sigs.k8s.io/kwok)
NODE_KUBE_VERSION=$(modver "$HERE/node/go.mod" k8s.io/kubernetes)
COREDNS_VERSION=$(modver "$HERE/coredns/go.mod" github.com/coredns/coredns)
for v in KUBE_VERSION KUBECTL_VERSION ETCD_VERSION KWOK_VERSION NODE_KUBE_VERSION COREDNS_VERSION; do
  [[ -n ${!v} ]] || { log "cannot read $v from go.mod"; exit 1; }
done
# kubectl v0.X.Y belongs to Kubernetes v1.X.Y.
if [[ ${KUBECTL_VERSION#v0.} != "${KUBE_VERSION#v1.}" ]]; then
  log "k8s.io/kubectl $KUBECTL_VERSION does not match k8s.io/kubernetes $KUBE_VERSION"; exit 1
fi
if [[ $NODE_KUBE_VERSION != "$KUBE_VERSION" ]]; then
  log "hack/k8s/node pins k8s.io/kubernetes $NODE_KUBE_VERSION, hack/k8s/kube $KUBE_VERSION"; exit 1
fi

KEY="${KUBE_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}"
DEST="$K8S_CACHE/$KEY"
if (( PRINT_DIR )); then echo "$DEST"; exit 0; fi

# Hash of everything that defines a module's build.
srchash() { # <module dir>
  (cd "$1" && cat go.mod go.sum $(find . -name '*.go' | LC_ALL=C sort)) | sha256sum | cut -c1-16
}

# Expected version string in each binary's version output.
expected_version() {
  case $1 in
    kube-apiserver|kube-controller-manager|kube-scheduler|kubelet|kube-proxy) echo "Kubernetes $KUBE_VERSION" ;;
    coredns) echo "CoreDNS-${COREDNS_VERSION#v}" ;;
    pause) echo "pause" ;;
    kubectl) echo "Client Version: $KUBE_VERSION" ;;
    etcd) echo "etcd Version: ${ETCD_VERSION#v}" ;;
    kwok) echo "$KWOK_VERSION" ;;
  esac
}
version_cmd() {
  case $1 in
    kubectl) "$DEST/kubectl" version --client 2>/dev/null ;;
    coredns) "$DEST/coredns" -version 2>/dev/null ;;
    pause) [[ -x $DEST/pause ]] && echo pause ;;
    *) "$DEST/$1" --version 2>/dev/null ;;
  esac
}
stamp_for() { # <bin>
  case $1 in
    kube-apiserver|kube-controller-manager|kube-scheduler|kubectl)
      echo "k8s.io/kubernetes@$KUBE_VERSION k8s.io/kubectl@$KUBECTL_VERSION $(srchash "$HERE/kube")" ;;
    etcd) echo "go.etcd.io/etcd/server/v3@$ETCD_VERSION $(srchash "$HERE/etcd")" ;;
    kwok) echo "sigs.k8s.io/kwok@$KWOK_VERSION $(srchash "$HERE/kwok")" ;;
    kubelet|kube-proxy) echo "k8s.io/kubernetes@$KUBE_VERSION $(srchash "$HERE/node")" ;;
    coredns) echo "github.com/coredns/coredns@$COREDNS_VERSION $(srchash "$HERE/coredns")" ;;
    pause) echo "pause $(srchash "$HERE/pause")" ;;
  esac
}
up_to_date() { # <bin>
  local bin=$1
  [[ -x $DEST/$bin && -f $DEST/.stamps/$bin ]] || return 1
  [[ $(cat "$DEST/.stamps/$bin") == "$(stamp_for "$bin")" ]] || return 1
  # Capture first: `| grep -q` could SIGPIPE the writer and fail under pipefail.
  local out
  out=$(version_cmd "$bin") || return 1
  [[ $out == *"$(expected_version "$bin")"* ]]
}

mkdir -p "$DEST/.stamps"
# One build at a time per cache (e.g. `make cluster` and a test session).
exec 9>"$K8S_CACHE/.lock"
flock 9

set_current() {
  ln -sfn "$KEY" "$K8S_CACHE/.current.tmp"
  mv -Tf "$K8S_CACHE/.current.tmp" "$K8S_CACHE/current"
}

ALL=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok)
if (( NODE )); then ALL+=(kubelet kube-proxy coredns pause); fi
TODO=()
for bin in "${ALL[@]}"; do
  if (( FORCE )) || ! up_to_date "$bin"; then TODO+=("$bin"); fi
done
if (( ${#TODO[@]} == 0 )); then
  set_current
  log "up to date: $DEST"
  echo "$DEST"
  exit 0
fi

command -v "$GO" >/dev/null || { log "go not found (need Go >= 1.24 to build ${TODO[*]})"; exit 1; }
log "building ${TODO[*]} with $("$GO" env GOVERSION) into $DEST"
export CGO_ENABLED=0 GOWORK=off GOFLAGS="${GOFLAGS:-} -trimpath -buildvcs=false"
BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
TMP=$(mktemp -d "$K8S_CACHE/.build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

kube_ldflags() {
  local ver=${KUBE_VERSION#v} major minor pkg ldflags="-s -w"
  major=${ver%%.*}; minor=${ver#*.}; minor=${minor%%.*}
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$BUILD_DATE"
  done
  echo "$ldflags"
}

want() { local b; for b in "$@"; do [[ " ${TODO[*]} " == *" $b "* ]] && return 0; done; return 1; }

build_plain() { # <bin> <version>: `go build .` in $HERE/<bin>, stripped, then installed and stamped
  local b=$1 start=$SECONDS
  (cd "$HERE/$b" && "$GO" build -ldflags "-s -w" -o "$TMP/$b" .)
  log "$b $2 built in $((SECONDS - start))s"
  mv -f "$TMP/$b" "$DEST/$b"; stamp_for "$b" > "$DEST/.stamps/$b"
}

# k8s.io/kubernetes + kubectl: one `go build` shares the common packages.
if want kube-apiserver kube-controller-manager kube-scheduler kubectl; then
  start=$SECONDS
  (cd "$HERE/kube" && "$GO" build -ldflags "$(kube_ldflags)" -o "$TMP/" \
      k8s.io/kubernetes/cmd/kube-apiserver \
      k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler \
      ./kubectl)
  log "kubernetes $KUBE_VERSION built in $((SECONDS - start))s"
  for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    mv -f "$TMP/$b" "$DEST/$b"; stamp_for "$b" > "$DEST/.stamps/$b"
  done
fi

if want etcd; then build_plain etcd "$ETCD_VERSION"; fi

if want kwok; then
  start=$SECONDS
  (cd "$HERE/kwok" && "$GO" build \
      -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" \
      -o "$TMP/kwok" sigs.k8s.io/kwok/cmd/kwok)
  log "kwok $KWOK_VERSION built in $((SECONDS - start))s"
  mv -f "$TMP/kwok" "$DEST/kwok"; stamp_for kwok > "$DEST/.stamps/kwok"
fi

if want kubelet kube-proxy; then
  start=$SECONDS
  (cd "$HERE/node" && "$GO" build -ldflags "$(kube_ldflags)" -o "$TMP/" \
      k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy)
  log "kubelet, kube-proxy $KUBE_VERSION built in $((SECONDS - start))s"
  for b in kubelet kube-proxy; do
    mv -f "$TMP/$b" "$DEST/$b"; stamp_for "$b" > "$DEST/.stamps/$b"
  done
fi

if want coredns; then build_plain coredns "$COREDNS_VERSION"; fi

if want pause; then
  (cd "$HERE/pause" && "$GO" build -ldflags "-s -w" -o "$TMP/pause" .)
  mv -f "$TMP/pause" "$DEST/pause"; stamp_for pause > "$DEST/.stamps/pause"
fi

for bin in "${ALL[@]}"; do
  if ! up_to_date "$bin"; then
    log "$bin does not report the expected version '$(expected_version "$bin")':"
    version_cmd "$bin" >&2 || true
    exit 1
  fi
done
set_current
log "done: $DEST"
echo "$DEST"
