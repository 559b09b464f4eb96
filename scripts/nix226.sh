#!/usr/bin/env bash
# Run the tests that use real Nix under Debian 13's Nix 2.26, in a trixie chroot.
#
#   bash scripts/nix226.sh                 the tests marked `nix` (pytest -m nix)
#   bash scripts/nix226.sh -k hook -x      extra arguments go to pytest
#   NIX226_SHELL=1 bash scripts/nix226.sh  an interactive shell in the chroot instead
#
# Users run Nix 2.18 and newer; the host's Debian 12 has 2.8.0, which differs exactly where
# the bridge depends on Nix (OUT_PATHS, `nix path-info --json`). The chroot (debootstrap
# minbase, nix-bin, python3, systemd-analyze, the two-line nix.conf, a venv with the test
# dependencies) is built once and cached as a tarball outside the checkout, in
# $NIX226_CACHE (default /var/cache/hydra-cachix-bridge): the first run takes two to three
# minutes, later runs unpack it in 10-20 s. Each run gets a fresh copy, so the chroot's Nix
# store starts empty. Root only.
set -euo pipefail
cd "$(dirname "$0")/.."
project=$PWD
cache=${NIX226_CACHE:-/var/cache/hydra-cachix-bridge}
[ "$(id -u)" = 0 ] || { echo "nix226: run as root (debootstrap, chroot, mount)" >&2; exit 2; }

# The image depends on this script and the test dependencies: a change to either builds anew.
deps=$(python3 -c 'import json, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(json.dumps([p["dependencies"], p.get("optional-dependencies")]))')
key=$( (cat scripts/nix226.sh; echo "$deps") | sha256sum | cut -c1-12)
image=$cache/trixie-nix-$key.tgz
root=$(mktemp -d /var/tmp/hcb-nix226.XXXXXX)
chmod 755 "$root"  # apt in the chroot drops to user _apt
mounted=()
unmount_all() {
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[i]}" 2>/dev/null || true; done
  mounted=()
}
cleanup() {
  unmount_all
  rm -rf --one-file-system "$root"
}
trap cleanup EXIT
mount_all() {
  mount -t proc proc "$root/proc" && mounted+=("$root/proc")
  mount --bind /dev "$root/dev" && mounted+=("$root/dev")
  # Nix 2.26 opens a pseudoterminal for every build.
  mount -t devpts -o newinstance,ptmxmode=0666 devpts "$root/dev/pts" && mounted+=("$root/dev/pts")
}
in_root() {
  local pass=()
  [ -z "${HCB_RACE_PROBE:-}" ] || pass+=("HCB_RACE_PROBE=$HCB_RACE_PROBE")
  chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_CERT=/etc/ssl/certs/host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NIX226_CHROOT=1 "${pass[@]}" "$@"
}
copy_project() {
  rm -rf "$root/src"
  mkdir -p "$root/src"
  tar -C "$project" --exclude=./.venv --exclude=./.git --exclude='*/__pycache__' -cf - . \
    | tar -C "$root/src" -xf -
  # The NixOS module tests look for nixpkgs' lib in ../shared beside the checkout.
  if [ -d "$project/../shared/nixpkgs-lib" ]; then
    mkdir -p "$root/shared"
    cp -r "$project/../shared/nixpkgs-lib" "$root/shared/"
  fi
}

build_image() {
  local started mirror
  started=$(date +%s)
  command -v debootstrap >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  mirror=$(grep -hoE '^URIs: *http[^ ]+/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | head -1 | sed 's/URIs: *//') || true
  [ -n "$mirror" ] || mirror=$(sed -n 's/^deb \(http[^ ]*\/debian\/*\) .*/\1/p' \
    /etc/apt/sources.list 2>/dev/null | head -1)
  [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
  echo "nix226: building the Debian 13 image (first run only, about two minutes) from $mirror"
  debootstrap --variant=minbase trixie "$root" "$mirror" >"$root.debootstrap.log" 2>&1 || {
    echo "nix226: debootstrap failed; last lines of its log:" >&2
    tail -20 "$root.debootstrap.log" >&2
    exit 1
  }
  rm -f "$root.debootstrap.log"
  cp /etc/resolv.conf "$root/etc/" 2>/dev/null || true
  mount_all
  in_root /bin/sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends nix-bin python3 python3-venv ca-certificates systemd >/dev/null'
  # nix-bin without recommends has no nix.conf; Nix's default build group does not exist.
  mkdir -p "$root/etc/nix"
  printf 'build-users-group =\nsandbox = false\n' > "$root/etc/nix/nix.conf"
  # Open the store once: two Nix processes that first open a new store at the same time race
  # creating its gcroots (Nix 2.26: "creating symlink .../gcroots/profiles: File exists").
  in_root nix-store --gc --print-roots >/dev/null
  # pip inside the chroot trusts what the host trusts (this network may re-sign TLS).
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/host-ca.crt"
  copy_project
  # The venv holds the test dependencies only; each run imports the bridge from /src.
  in_root /bin/sh -c 'python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install -q "/src[test]" \
    && /opt/venv/bin/pip uninstall -q -y hydra-cachix-bridge'
  rm -rf "$root/src" "$root/shared"
  in_root /bin/sh -c 'apt-get clean; rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* \
    /usr/share/locale/* /root/.cache'
  unmount_all
  mkdir -p "$cache"
  # Stale images of older keys are no use any more.
  rm -f "$cache"/trixie-nix-*.tgz
  tar -C "$root" -czf "$image.tmp" . && mv "$image.tmp" "$image"
  rm -rf --one-file-system "$root"
  mkdir -p "$root"
  echo "nix226: image ready in $(( $(date +%s) - started )) s: $image ($(du -h "$image" | cut -f1))"
}

# A failed build leaves no image: the tarball is renamed into place only when complete.
[ -f "$image" ] || build_image

started=$(date +%s)
tar -C "$root" -xzf "$image"
copy_project
mount_all
echo "nix226: chroot ready in $(( $(date +%s) - started )) s: $(in_root nix-build --version | head -1)"

if [ -n "${NIX226_SHELL:-}" ]; then
  in_root /bin/bash -c 'cd /src && exec bash -i'
  exit 0
fi
set +e
in_root /bin/sh -c 'cd /src && exec python -m pytest -q -p no:cacheprovider -m nix "$@"' pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "nix226: pytest selected no tests marked nix: that is a failure here" >&2
  exit 1
fi
exit "$status"
