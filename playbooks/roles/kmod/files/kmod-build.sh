#!/bin/sh
# Build the module with Kbuild out of the source tree:
#   kmod-build.sh SOURCE_DIR BUILD_DIR KDIR MODULE
# Copies only source files (never build products lying in the checkout) to
# BUILD_DIR and runs make there.  Prints "built BUILD_DIR/MODULE.ko", or
# "up to date ..." when that file already exists.
set -eu
src=$1 build=$2 kdir=$3 module=$4
if [ -f "$build/$module.ko" ]; then
  echo "up to date $build/$module.ko"
  exit 0
fi
if [ ! -f "$kdir/Makefile" ]; then
  echo "no kernel headers at $kdir" >&2
  exit 1
fi
rm -rf "$build.tmp"
mkdir -p "$build.tmp"
(cd "$src" && find . -path ./vm -prune -o -type f \( -name '*.c' -o -name '*.h' -o -name Makefile \
  -o -name Kbuild -o -name dkms.conf \) -print | xargs cp --parents -t "$build.tmp")
make -s -C "$build.tmp" KDIR="$kdir" >"$build.tmp/build.log" 2>&1 || {
  tail -n 20 "$build.tmp/build.log" >&2
  echo "make failed (KDIR=$kdir); full log in $build.tmp/build.log" >&2
  exit 1
}
rm -rf "$build"
mv "$build.tmp" "$build"
echo "built $build/$module.ko"
