#!/usr/bin/env bash
# The real node's sandbox image mpnn.local/pause:1: the pause binary from `hack/k8s/build.sh --node`
# in a one-layer OCI archive, $IMAGE_CACHE/pause-<hash>.oci.tar (prints its path).
# Usage: hack/image/pause.sh PAUSE_BINARY
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
IMAGE_CACHE=${IMAGE_CACHE:-$HOME/.cache/mpnn/image}
BIN=$1
KEY=$(cat "$BIN" "$HERE/oci.py" "$HERE/pause.sh" | sha256sum | cut -c1-16)
OUT="$IMAGE_CACHE/pause-$KEY.oci.tar"
if [[ ! -f $OUT ]]; then
  mkdir -p "$IMAGE_CACHE"
  TMP=$(mktemp -d "$IMAGE_CACHE/.pause.XXXXXX")
  trap 'rm -rf "$TMP"' EXIT
  mkdir -p "$TMP/rootfs"
  install -m 0755 "$BIN" "$TMP/rootfs/pause"
  python3 "$HERE/oci.py" "$TMP/rootfs" "$TMP/pause.tar" --name mpnn.local/pause:1 \
    --entrypoint /pause --user 65535:65535 --epoch 1704067200 >/dev/null
  mv "$TMP/pause.tar" "$OUT"
fi
echo "$OUT"
