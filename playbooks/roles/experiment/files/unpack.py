#!/usr/bin/env python3
"""Unpack a node's results archive into the controller's results folder.

usage: unpack.py ARCHIVE RESULTS PREFIX

ARCHIVE was made on the node by "python -m tarfile -c ARCHIVE PREFIX/HOST
PREFIX/plan.json", so members are named after their node-side path (without
the leading /).  Only members below PREFIX are taken, relative to it; links,
devices and paths leaving RESULTS are skipped.  ARCHIVE is removed afterwards.
"""

import os
import sys
import tarfile

archive, results, prefix = sys.argv[1], sys.argv[2], sys.argv[3].strip("/") + "/"
count = 0
with tarfile.open(archive) as tar:
    for member in tar.getmembers():
        if not member.name.startswith(prefix):
            continue
        rel = member.name[len(prefix) :]
        if not rel or rel.startswith("/") or ".." in rel.split("/"):
            continue
        target = os.path.join(results, rel)
        if member.isdir():
            os.makedirs(target, exist_ok=True)
        elif member.isfile():
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with tar.extractfile(member) as src, open(target + ".tmp", "wb") as dst:
                dst.write(src.read())
            os.replace(target + ".tmp", target)
            count += 1
os.unlink(archive)
try:
    os.rmdir(os.path.dirname(archive))  # .incoming, once every node is unpacked
except OSError:
    pass
print(f"unpacked {count} files of {archive} into {results}")
