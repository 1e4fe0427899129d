#!/usr/bin/env python3
# Unpack a node's results archive (made by "python -m tarfile -c ARCHIVE HOSTDIR
# PLAN") into the controller's results folder: ARCHIVE RESULTS.  Members are
# stored with their node-side path; everything from ".../results/" on is kept.
import os
import sys
import tarfile

archive, results = sys.argv[1], sys.argv[2]
with tarfile.open(archive) as tar:
    for member in tar.getmembers():
        head, sep, rel = member.name.rpartition("results/")
        if not sep or not rel or rel.startswith("/") or ".." in rel.split("/"):
            continue
        if not (member.isfile() or member.isdir()):
            continue
        target = os.path.join(results, rel)
        if member.isdir():
            os.makedirs(target, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with tar.extractfile(member) as src, open(target + ".tmp", "wb") as dst:
            dst.write(src.read())
        os.replace(target + ".tmp", target)
os.unlink(archive)
try:
    os.rmdir(os.path.dirname(archive))  # .incoming, once every node is unpacked
except OSError:
    pass
print(f"unpacked {archive} into {results}")
