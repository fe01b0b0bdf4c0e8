#!/usr/bin/env bash
# Builds what a tiny test VM needs: Debian's cloud kernel and its virtio modules (downloaded
# once, cached), and a busybox initramfs holding whatever the caller puts in an extra directory
# (its /init and programs).
#
#   scripts/build-vm.sh CACHE_DIR
#       fetch the kernel into CACHE_DIR (once); prints CACHE_DIR/vmlinuz
#   scripts/build-vm.sh CACHE_DIR OUT.cpio.gz EXTRA_DIR
#       also build OUT.cpio.gz: busybox (static) with its applets, the virtio modules under
#       /modules (decompressed: busybox insmod cannot read .ko.xz), and EXTRA_DIR copied on top
#
# The kernel package is whatever Debian's linux-image-cloud-amd64 meta-package depends on, so the
# cache follows the distribution's kernel without a hard-coded version.
set -euo pipefail

cache=${1:?usage: build-vm.sh CACHE_DIR [OUT.cpio.gz EXTRA_DIR]}
out=${2:-}
extra=${3:-}
modules=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk)

mkdir -p "$cache"
cache=$(cd "$cache" && pwd)

fetch_kernel() {
  if [ -s "$cache/vmlinuz" ] && [ -s "$cache/modules/virtio_blk.ko" ]; then
    return
  fi
  local pkg deb
  pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  if [ -z "$pkg" ]; then
    apt-get update -qq >/dev/null
    pkg=$(apt-cache depends linux-image-cloud-amd64 |
      awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  fi
  [ -n "$pkg" ] || { echo "build-vm: no linux-image-*-cloud-amd64 package found" >&2; exit 1; }
  rm -rf "$cache/download" "$cache/root"
  mkdir -p "$cache/download" "$cache/root" "$cache/modules.tmp"
  (cd "$cache/download" && apt-get download -qq "$pkg")
  deb=$(ls "$cache"/download/*.deb | head -n1)
  dpkg-deb -x "$deb" "$cache/root"
  local name file
  for name in "${modules[@]}"; do
    file=$(find "$cache/root/lib/modules" -name "$name.ko*" | head -n1)
    [ -n "$file" ] || { echo "build-vm: module $name not found in $pkg" >&2; exit 1; }
    case "$file" in
      *.ko.xz) xz -dc "$file" >"$cache/modules.tmp/$name.ko" ;;
      *.ko.zst) zstd -qdc "$file" >"$cache/modules.tmp/$name.ko" ;;
      *.ko.gz) gzip -dc "$file" >"$cache/modules.tmp/$name.ko" ;;
      *) cp "$file" "$cache/modules.tmp/$name.ko" ;;
    esac
  done
  cp "$(ls "$cache"/root/boot/vmlinuz-* | head -n1)" "$cache/vmlinuz.tmp"
  rm -rf "$cache/modules"
  mv "$cache/modules.tmp" "$cache/modules"
  mv "$cache/vmlinuz.tmp" "$cache/vmlinuz"
  echo "$pkg" >"$cache/kernel-package"
  # the extracted tree is large and no longer needed
  rm -rf "$cache/root" "$cache/download"
}

build_initramfs() {
  local stage
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' RETURN
  mkdir -p "$stage"/{bin,sbin,dev,proc,sys,tmp,modules}
  cp "$(command -v busybox)" "$stage/bin/busybox"
  local applet
  for applet in sh mount insmod mkswap swapon swapoff cat echo poweroff sleep free grep ls; do
    ln -s busybox "$stage/bin/$applet"
  done
  local name
  for name in "${modules[@]}"; do
    cp "$cache/modules/$name.ko" "$stage/modules/"
  done
  printf '%s\n' "${modules[@]}" >"$stage/modules/order"
  cp -a "$extra"/. "$stage"/
  (cd "$stage" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$out"
}

fetch_kernel
if [ -n "$out" ]; then
  [ -n "$extra" ] || { echo "build-vm: EXTRA_DIR is required with OUT" >&2; exit 2; }
  build_initramfs
fi
echo "$cache/vmlinuz"
