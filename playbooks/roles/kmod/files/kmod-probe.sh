#!/bin/sh
# Probe a node for the kmod role in one round trip (no Python needed):
#   kmod-probe.sh SOURCE_DIR MODULE LOADED_MARKER
# Prints one JSON object: kernel release, module support, headers, DKMS,
# module source fingerprint, whether (and which source version) is loaded.
src=$1 module=$2 marker=$3
release=$(uname -r)
yesno() { if "$@"; then echo true; else echo false; fi; }
fingerprint=""
if [ -f "$src/Makefile" ]; then
  fingerprint=$(cd "$src" && find . -path ./vm -prune -o -type f \( -name '*.c' -o -name '*.h' \
    -o -name Makefile -o -name Kbuild -o -name dkms.conf \) -print | LC_ALL=C sort |
    xargs sha256sum | sha256sum | cut -c1-12)
fi
loaded_version=""
[ -r "$marker" ] && loaded_version=$(cat "$marker")
os_family=other
if [ -r /etc/os-release ]; then
  ids=$(. /etc/os-release; echo "$ID $ID_LIKE")
  case " $ids " in
    *" debian "*|*" ubuntu "*) os_family=Debian ;;
    *" rhel "*|*" fedora "*|*" centos "*) os_family=RedHat ;;
  esac
fi
cat <<JSON
{"release": "$release",
 "modules": $(yesno test -e /proc/modules),
 "headers": $(yesno test -f "/lib/modules/$release/build/Makefile"),
 "dkms": $(if command -v dkms >/dev/null 2>&1; then echo true; else echo false; fi),
 "dkms_conf": $(yesno test -f "$src/dkms.conf"),
 "source": $(yesno test -f "$src/Makefile"),
 "fingerprint": "$fingerprint",
 "loaded": $(yesno test -d "/sys/module/$module"),
 "loaded_version": "$loaded_version",
 "os_family": "$os_family"}
JSON
