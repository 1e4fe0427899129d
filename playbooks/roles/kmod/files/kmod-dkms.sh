#!/bin/sh
# Add, build and install the module with DKMS for one kernel:
#   kmod-dkms.sh SOURCE_DIR DKMS_SRC_ROOT MODULE FINGERPRINT RELEASE
# The DKMS version is PACKAGE_VERSION (from dkms.conf) .g<fingerprint>: a
# changed source is a new DKMS version.  Prints "installed ..." or
# "already installed ...".
set -eu
src=$1 root=$2 module=$3 fingerprint=$4 release=$5
base=$(sed -n 's/^PACKAGE_VERSION="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$src/dkms.conf")
version="${base:-0}.g$fingerprint"
if dkms status -m "$module" -v "$version" -k "$release" 2>/dev/null | grep -q installed; then
  echo "already installed $module/$version for $release"
  exit 0
fi
dest="$root/$module-$version"
if ! dkms status -m "$module" -v "$version" 2>/dev/null | grep -q .; then
  rm -rf "$dest"
  mkdir -p "$dest"
  (cd "$src" && find . -path ./vm -prune -o -type f \( -name '*.c' -o -name '*.h' -o -name Makefile \
    -o -name Kbuild -o -name dkms.conf \) -print | xargs cp --parents -t "$dest")
  sed -i "s/^PACKAGE_VERSION=.*/PACKAGE_VERSION=\"$version\"/" "$dest/dkms.conf"
  dkms add -m "$module" -v "$version"
fi
dkms build -m "$module" -v "$version" -k "$release"
dkms install -m "$module" -v "$version" -k "$release"
echo "installed $module/$version for $release"
