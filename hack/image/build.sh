#!/usr/bin/env bash
# Build (or reuse) the mpnn image as a one-layer OCI archive, with no registry and no Docker daemon.
#
#   1. base:  debootstrap --variant=minbase --include=python3,python3-venv bookworm  (Python 3.11),
#             cached as a tar under $IMAGE_CACHE/base/ keyed by suite, packages and this script;
#   2. image: the base, a venv /opt/mpnn with the project and its dependencies
#             (pip install '.[operator]', as the Dockerfile does), user/group 65532 "mpnn",
#             written by hack/image/oci.py into $IMAGE_CACHE/mpnn-<key>.oci.tar, where <key> is a
#             content hash of every input (the project's files, this script, oci.py, the base key).
#
# Same config as the Dockerfile: USER 65532:65532, ENTRYPOINT ["mpnn"], CMD ["--help"],
# WORKDIR /home/mpnn, PATH=/opt/mpnn/bin:..., PYTHONUNBUFFERED=1, PYTHONDONTWRITEBYTECODE=1
# (tests/unit/test_image.py checks the two agree).
#
# Usage: hack/image/build.sh [--print-path]   (prints the archive's path)
# Env:   IMAGE_CACHE (default ~/.cache/mpnn/image), IMAGE_NAME (default ghcr.io/mpnn/mpnn:<version>),
#        DEBIAN_MIRROR (default http://deb.debian.org/debian), KEEP_IMAGES (archives kept, default 3).
# Needs root (debootstrap, chroot), debootstrap, unshare; the Debian mirror and PyPI reachable on a
# cold build. Runs under `nice -n 19`.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
IMAGE_CACHE=${IMAGE_CACHE:-$HOME/.cache/mpnn/image}
SUITE=bookworm
BASE_PKGS=python3,python3-venv
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Fixed timestamps: file mtimes in the layer are clamped to this, and the config's "created".
export SOURCE_DATE_EPOCH=1704067200  # 2024-01-01T00:00:00Z
PRINT_PATH=0
for arg in "$@"; do
  case $arg in
    --print-path) PRINT_PATH=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "image/build.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done
log() { echo "[image] $*" >&2; }

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -1)
IMAGE_NAME=${IMAGE_NAME:-ghcr.io/mpnn/mpnn:$VERSION}

# The project's inputs: what the Dockerfile copies, as git sees the work tree (tracked and
# untracked-not-ignored files that exist).
project_files() {
  (cd "$ROOT" && git ls-files -co --exclude-standard -- pyproject.toml README.md partition_server operator \
     | LC_ALL=C sort | while IFS= read -r f; do [[ -f $f ]] && printf '%s\n' "$f"; done)
}
BASE_KEY=$( { echo "$SUITE $BASE_PKGS base-v1"; } | sha256sum | cut -c1-16)
KEY=$( {
  echo "$BASE_KEY $IMAGE_NAME $SOURCE_DATE_EPOCH"
  cat "$HERE/build.sh" "$HERE/oci.py"
  project_files | while IFS= read -r f; do echo "== $f"; cat "$ROOT/$f"; done
} | sha256sum | cut -c1-16)
OUT="$IMAGE_CACHE/mpnn-$KEY.oci.tar"
if (( PRINT_PATH )); then echo "$OUT"; exit 0; fi

mkdir -p "$IMAGE_CACHE/base" "$IMAGE_CACHE/pip"
exec 9>"$IMAGE_CACHE/.lock"
flock 9
if [[ -f $OUT ]]; then
  ln -sfn "$(basename "$OUT")" "$IMAGE_CACHE/mpnn-current.oci.tar"
  log "up to date: $OUT"; echo "$OUT"; exit 0
fi
[[ $(id -u) == 0 ]] || { log "building the image needs root (debootstrap, chroot)"; exit 1; }
for tool in debootstrap unshare chroot; do
  command -v $tool >/dev/null || { log "$tool not found (apt-get install debootstrap util-linux)"; exit 1; }
done

TMP=$(mktemp -d "$IMAGE_CACHE/.build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
BASE="$IMAGE_CACHE/base/$SUITE-$BASE_KEY.tar"
if [[ ! -f $BASE ]]; then
  start=$SECONDS
  log "debootstrap $SUITE ($BASE_PKGS) from $MIRROR"
  nice -n 19 debootstrap --variant=minbase --include="$BASE_PKGS" "$SUITE" "$TMP/base" "$MIRROR" \
    > "$TMP/debootstrap.log" 2>&1 || { tail -30 "$TMP/debootstrap.log" >&2; exit 1; }
  rm -rf "$TMP/base/var/cache/apt/archives/"*.deb "$TMP/base/var/lib/apt/lists/"* "$TMP/base/var/log/"*
  (cd "$TMP/base" && tar --numeric-owner -cf "$TMP/base.tar" .)
  mv "$TMP/base.tar" "$BASE"
  rm -rf "$TMP/base"
  log "base built in $((SECONDS - start))s: $BASE"
fi

start=$SECONDS
R="$TMP/rootfs"
mkdir -p "$R"
tar --numeric-owner -xpf "$BASE" -C "$R"
mkdir -p "$R/src"
(cd "$ROOT" && project_files | tar -cf - -T -) | tar -xf - -C "$R/src"
cp /etc/resolv.conf "$R/etc/resolv.conf"
CA=""
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
  cp /etc/ssl/certs/ca-certificates.crt "$R/tmp/ca.crt"; CA=/tmp/ca.crt
fi
# pip's download cache persists in $IMAGE_CACHE/pip (wheels only; the image gets none of it).
# Mounts live in a private mount namespace: they vanish with it, whatever happens.
nice -n 19 unshare --mount --propagation private --fork bash -euo pipefail -c '
  R=$1 CA=$2
  mount -t proc proc "$R/proc"
  mount --bind /dev "$R/dev"
  mkdir -p "$R/root/.cache/pip" && mount --bind "$3" "$R/root/.cache/pip"
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1 \
      ${CA:+PIP_CERT=$CA} chroot "$R" /bin/sh -euc "
    python3 -m venv /opt/mpnn
    /opt/mpnn/bin/pip install --quiet --no-compile \"/src[operator]\"
    /opt/mpnn/bin/mpnn --help >/dev/null
    groupadd --system --gid 65532 mpnn
    useradd --system --uid 65532 --gid 65532 --home-dir /home/mpnn --create-home --shell /usr/sbin/nologin mpnn
  "
' _ "$R" "$CA" "$IMAGE_CACHE/pip" > "$TMP/install.log" 2>&1 || { tail -40 "$TMP/install.log" >&2; exit 1; }
rm -rf "$R/src" "$R/root/.cache" "$R/tmp/"* "$R/var/log/"* "$R/var/cache/ldconfig/aux-cache" \
       "$R/usr/share/doc/"* "$R/usr/share/man/"* "$R/usr/share/info/"*
find "$R/opt/mpnn" -name __pycache__ -prune -exec rm -rf {} +
: > "$R/etc/resolv.conf"
: > "$R/etc/machine-id" 2>/dev/null || true
PYVER=$(ls "$R/opt/mpnn/lib" | sed -n 's/^python\([0-9]*\.[0-9]*\)$/\1/p')
log "project installed in $((SECONDS - start))s (python $PYVER)"

start=$SECONDS
nice -n 19 python3 "$HERE/oci.py" "$R" "$TMP/image.tar" --name "$IMAGE_NAME" \
  --entrypoint mpnn --cmd=--help --user 65532:65532 --workdir /home/mpnn \
  --env PATH=/opt/mpnn/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env PYTHONUNBUFFERED=1 --env PYTHONDONTWRITEBYTECODE=1 \
  --label org.opencontainers.image.title=mpnn --label org.opencontainers.image.version="$VERSION" \
  --label dev.mpnn.python="$PYVER" --label dev.mpnn.inputs="$KEY" >/dev/null
mv "$TMP/image.tar" "$OUT"
ln -sfn "$(basename "$OUT")" "$IMAGE_CACHE/mpnn-current.oci.tar"
log "archive written in $((SECONDS - start))s: $OUT ($(du -h "$OUT" | cut -f1))"
# Every source change makes a new 135 MB archive: keep the newest KEEP_IMAGES (default 3).
ls -1t "$IMAGE_CACHE"/mpnn-*.oci.tar 2>/dev/null | grep -v -- '-current\.oci\.tar$' \
  | tail -n +$(( ${KEEP_IMAGES:-3} + 1 )) | while IFS= read -r old; do
  rm -f -- "$old" && log "removed the older archive $old"
done
echo "$OUT"
