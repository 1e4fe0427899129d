#!/bin/sh
# Load the module (unloading one built from another source version first),
# record the loaded version and verify the character device:
#   kmod-load.sh MODULE VERSION MARKER DEVICE TIMEOUT_S insmod|modprobe KO_PATH [PARAM=VALUE...]
# Prints "already loaded", "loaded" or "reloaded", then the device.
set -eu
module=$1 version=$2 marker=$3 device=$4 timeout=$5 loader=$6 ko=$7
shift 7
word=loaded
if [ -d "/sys/module/$module" ]; then
  if [ "$(cat "$marker" 2>/dev/null)" = "$version" ]; then
    word="already loaded"
  else
    rmmod "$module"
    word=reloaded
  fi
fi
if [ "$word" != "already loaded" ]; then
  if [ "$loader" = modprobe ]; then modprobe "$module" "$@"; else insmod "$ko" "$@"; fi
  echo "$version" >"$marker"
fi
i=0
while [ ! -e "$device" ] && [ "$i" -lt $((timeout * 10)) ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -c "$device" ]; then
  echo "$module is loaded but $device is not a character device after ${timeout}s" >&2
  exit 1
fi
echo "$word $module ($version), $device ready"
