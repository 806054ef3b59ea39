#!/usr/bin/env bash
# The one list of what an aarch64 device build of pe-clip needs (`--no-default-features
# --features camera`): a C cross compiler (tract assembles its arm64 kernels with it), the arm64
# C library and kernel headers (v4l's bindgen reads <linux/videodev2.h>), libclang (bindgen), and
# qemu to run the result on an x86_64 machine.
#
#   scripts/aarch64-deps.sh debian                     on a Debian/Ubuntu x86_64 host (.ci/run)
#   scripts/aarch64-deps.sh aarch64-unknown-linux-gnu  inside cross's image: cross.toml's
#       pre-build runs this file with the target; the image already has the cross gcc and libc
set -euo pipefail
mode="${1:-debian}"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
apt_install() {
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}
case "$mode" in
  debian)
    need=()
    command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
    [ -e /usr/aarch64-linux-gnu/include/linux/videodev2.h ] || need+=(linux-libc-dev-arm64-cross)
    command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
    compgen -G '/usr/lib/llvm-*/lib/libclang.so*' >/dev/null \
      || compgen -G '/usr/lib/*/libclang-[0-9]*.so*' >/dev/null || need+=(libclang-dev)
    if [ "${#need[@]}" -gt 0 ]; then
      $SUDO apt-get update -q
      apt_install "${need[@]}"
    fi
    ;;
  aarch64-unknown-linux-gnu)
    dpkg --add-architecture arm64
    apt-get update -q
    apt_install libclang-dev linux-libc-dev:arm64
    ;;
  *)
    echo "usage: $0 debian | aarch64-unknown-linux-gnu" >&2
    exit 2
    ;;
esac
