#!/usr/bin/env bash
# Board check on aarch64 (docs/board-check.md): run the board test set in an arm64 Debian
# bookworm root under qemu-user, with the board side installed from aarch64 wheels only,
# and compare against the golden files written on x86-64 (tests/board/golden/).
#
#   sudo scripts/check_aarch64.sh            # build or reuse the cached root, run, print a table
#   ARM64_ROOT=/path scripts/check_aarch64.sh
#   FRESH=1 scripts/check_aarch64.sh         # rebuild the root and the board venv from scratch
#
# Needs root (debootstrap, chroot, mounts) and a Debian/Ubuntu host; the root is cached
# (default /var/cache/solar-edge/arm64-bookworm) and never committed.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${ARM64_ROOT:-/var/cache/solar-edge/arm64-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
VENV=/opt/board-venv          # inside the root
SRC=/opt/solar-edge           # inside the root: the tests and the project wheel
# the board test set (tests/board_set.py): tests/board/ and the core modules it marks
PYTEST_ARGS=${PYTEST_ARGS:--m board tests/board tests/test_prng.py tests/test_packet.py \
  tests/test_vera.py}
STEPS=()
FAIL=0

now() { date +%s.%N; }
step() {  # step NAME CMD...: run, time and record one step; a failure is recorded, not fatal
  local name=$1; shift
  local t0 rc=0; t0=$(now)
  echo "== $name" >&2
  "$@" || rc=$?
  local dt; dt=$(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')
  STEPS+=("$(printf '%-26s %8s s  %s' "$name" "$dt" "$([ $rc = 0 ] && echo ok || echo "FAILED rc=$rc")")")
  [ $rc = 0 ] || FAIL=1
  return $rc
}
table() {
  echo
  echo "board check $(date -u +%Y-%m-%dT%H:%MZ) commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
  printf '%-26s %10s  %s\n' step "wall" result
  printf '%s\n' "${STEPS[@]}"
}
trap 'cleanup_mounts; table' EXIT

host_tools() {
  local need=()
  command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  command -v update-binfmts >/dev/null || need+=(binfmt-support)
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  fi
}

binfmt() {  # qemu-aarch64 must be registered with binfmt_misc for chroot to run arm64 binaries
  mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
  grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64
}

no_mounts_under_root() {  # never rm -rf a root with /dev or /proc still mounted inside
  ! findmnt -rn -o TARGET | grep -q "^$ROOT/"
}

build_root() {
  if [ -n "${FRESH:-}" ] && [ -d "$ROOT" ]; then
    cleanup_mounts
    no_mounts_under_root || { echo "mounts left under $ROOT: not removing it" >&2; return 1; }
    rm -rf "$ROOT"
  fi
  [ -e "$ROOT/.solar-root-complete" ] && { echo "reusing $ROOT" >&2; return 0; }
  no_mounts_under_root || { echo "mounts left under $ROOT: not removing it" >&2; return 1; }
  rm -rf "$ROOT"; mkdir -p "$(dirname "$ROOT")"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$ROOT" "$MIRROR" >/dev/null
  touch "$ROOT/.solar-root-complete"
}

# onnxruntime reads /proc/cpuinfo at import; qemu-user shows the host's x86 one, and
# onnxruntime then crashes. A cpuinfo describing an aarch64 CPU is bind-mounted over it.
CPUINFO_TEXT='processor	: 0
BogoMIPS	: 50.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x3
CPU part	: 0xd0c
CPU revision	: 1
'
MOUNTED=()
mounts() {
  mkdir -p "$ROOT/proc" "$ROOT/dev" "$ROOT/tmp"
  mountpoint -q "$ROOT/proc" || { mount -t proc proc "$ROOT/proc"; MOUNTED+=("$ROOT/proc"); }
  mountpoint -q "$ROOT/dev" || { mount --bind /dev "$ROOT/dev"; MOUNTED+=("$ROOT/dev"); }
  mkdir -p "$ROOT/sys"  # cpuinfo reads /sys/devices/system/cpu/{possible,present}
  mountpoint -q "$ROOT/sys" || { mount -o ro --bind /sys "$ROOT/sys"; MOUNTED+=("$ROOT/sys"); }
  printf '%s' "$CPUINFO_TEXT" > "$ROOT/tmp/cpuinfo.aarch64"
  mount --bind "$ROOT/tmp/cpuinfo.aarch64" "$ROOT/proc/cpuinfo"
  MOUNTED+=("$ROOT/proc/cpuinfo")
  cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
  # the host's CA bundle (a TLS-inspecting proxy's CA, if any); nothing else of its pip setup
  cp -L "${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}" "$ROOT/etc/ssl/host-ca.crt"
}
cleanup_mounts() {
  local i
  for ((i=${#MOUNTED[@]}-1; i>=0; i--)); do umount "${MOUNTED[$i]}" 2>/dev/null || true; done
  MOUNTED=()
}

# Everything inside the root runs with a clean environment: no PIP_* variables and no pip
# config from the host (find-links, extra indexes), so only PyPI's aarch64 wheels are used.
in_root() {
  env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 PIP_CONFIG_FILE=/dev/null \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=/etc/ssl/host-ca.crt OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
    "$(command -v chroot)" "$ROOT" /bin/sh -c "$1"
}

project_wheel() {  # a pure-python wheel of this checkout, built on the host (no deps)
  rm -rf "$ROOT$SRC"; mkdir -p "$ROOT$SRC/dist"
  local py=${HOST_PYTHON:-$REPO/.venv/bin/python}
  [ -x "$py" ] || py=python3
  env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$py" -m pip wheel -q --no-deps \
    --no-build-isolation -w "$ROOT$SRC/dist" "$REPO" >/tmp/solar-board-wheel.log 2>&1
  cp -r "$REPO/tests" "$REPO/scripts" "$ROOT$SRC/"
  # golden files some tests read by repo path (a folder without __init__.py: the installed
  # package is still the one imported)
  mkdir -p "$ROOT$SRC/solar_edge" && cp -r "$REPO/solar_edge/golden" "$ROOT$SRC/solar_edge/"
  cp "$REPO/pyproject.toml" "$ROOT$SRC/"
  find "$ROOT$SRC/tests" -name __pycache__ -prune -exec rm -rf {} +
}

tiny_bundle() {  # the golden model outputs' bundle: exported on the host (torch), deterministic
  local py=${HOST_PYTHON:-$REPO/.venv/bin/python}
  "$py" -c "import sys; from solar_edge.exporters.pipeline import export_bundle; \
export_bundle('solar_edge.exporters.examples:tiny_gpt2', 'x86-64', sys.argv[1])" \
    "$ROOT$SRC/tiny-bundle" >/dev/null 2>&1
}

board_venv() {  # the board side only: the wheel with its [tflite] extra, plus pytest
  if [ -n "${FRESH:-}" ]; then rm -rf "$ROOT$VENV"; fi
  [ -x "$ROOT$VENV/bin/python" ] || in_root "python3 -m venv $VENV"
  local whl; whl=$(cd "$ROOT$SRC/dist" && ls solar_edge-*.whl)
  in_root "$VENV/bin/pip install -q --only-binary=:all: '$SRC/dist/$whl[tflite]' pytest \
    && $VENV/bin/pip install -q --no-deps --force-reinstall '$SRC/dist/$whl'"
}

board_tests() {
  in_root "cd $SRC && SOLAR_BOARD_BUNDLE=$SRC/tiny-bundle \
    $VENV/bin/python -m pytest -q -p no:cacheprovider $PYTEST_ARGS" \
    | tee /tmp/solar-board-pytest.log | tail -n 25
  return "${PIPESTATUS[0]}"
}

golden() {  # per-item comparison with the x86-64 golden files
  in_root "cd $SRC/tests/board && $VENV/bin/python golden_cases.py \
    && $VENV/bin/python model_golden.py $SRC/tiny-bundle" | tee /tmp/solar-board-golden.log
  return "${PIPESTATUS[0]}"
}

suite_collects() {  # the whole suite collects on the board install (skips carry reasons)
  in_root "cd $SRC && $VENV/bin/python -m pytest -q -p no:cacheprovider --collect-only tests" \
    > /tmp/solar-board-collect.log 2>&1
  local rc=$?
  grep -E "^SKIPPED|tests? collected|^ERROR|errors? during" /tmp/solar-board-collect.log \
    | sed 's/^/  /'
  return $rc
}

versions() {
  in_root "$VENV/bin/python -c 'import platform, numpy, onnxruntime; \
print(platform.machine(), \"python\", platform.python_version(), \"numpy\", numpy.__version__, \
\"onnxruntime\", onnxruntime.__version__)'"
}

[ "$(id -u)" = 0 ] || { echo "needs root (debootstrap, chroot, mounts)" >&2; exit 2; }
step "host tools" host_tools
step "binfmt qemu-aarch64" binfmt
step "arm64 root (debootstrap)" build_root
step "mounts + cpuinfo" mounts
step "project wheel (host)" project_wheel
step "tiny bundle (host export)" tiny_bundle
step "board venv (aarch64 whl)" board_venv
step "versions" versions
step "golden comparison" golden || true
step "board tests (pytest)" board_tests || true
step "whole suite collects" suite_collects || true
exit $FAIL
