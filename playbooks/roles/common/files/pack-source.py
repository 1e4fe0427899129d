#!/usr/bin/env python3
"""Pack parts of the testbed checkout into a reproducible .tar.gz (controller side).

usage: pack-source.py SOURCE_DIR OUT_DIR ITEM...

Skips __pycache__, *.pyc, *.ko/*.o build products and VCS files; fixed mtimes and
owners so that the same source gives the same archive.  Adds a marker file
.source-<sha256 of the content>.  Prints {"tar": PATH, "sha256": HEX} as JSON.
"""

import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

SKIP_DIRS = {"__pycache__", ".git", ".pytest_cache", ".ruff_cache", ".tmp_versions"}
SKIP_EXT = (".pyc", ".o", ".ko", ".mod", ".mod.c", ".cmd", ".order", ".symvers", ".egg-info")


def files(src, items):
    for item in items:
        top = os.path.join(src, item)
        if os.path.isfile(top):
            yield item
            continue
        for root, dirs, names in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
            for name in sorted(names):
                if not name.endswith(SKIP_EXT):
                    yield os.path.relpath(os.path.join(root, name), src)


def main():
    src, out_dir, items = sys.argv[1], sys.argv[2], sys.argv[3:]
    paths = sorted(files(src, items))
    digest = hashlib.sha256()
    for rel in paths:
        with open(os.path.join(src, rel), "rb") as f:
            digest.update(rel.encode() + b"\0" + f.read() + b"\0")
    sha = digest.hexdigest()
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"testbed-src-{sha[:16]}.tar.gz")
    if not os.path.exists(out):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for rel in paths + [f".source-{sha}"]:
                full = os.path.join(src, rel)
                info = tarfile.TarInfo(rel)
                if os.path.exists(full):
                    with open(full, "rb") as f:
                        data = f.read()
                else:
                    data = sha.encode() + b"\n"
                info.size, info.mtime, info.uid, info.gid = len(data), 0, 0, 0
                info.mode = 0o755 if os.access(full, os.X_OK) and os.path.exists(full) else 0o644
                tar.addfile(info, io.BytesIO(data))
        tmp = out + ".tmp"
        with open(tmp, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
            gz.write(raw.getvalue())
        os.replace(tmp, out)
    print(json.dumps({"tar": out, "sha256": sha}))


if __name__ == "__main__":
    main()
