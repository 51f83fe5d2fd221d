"""The content hash of a corpus (a file, or every visible file under a folder): what the
tokenized-corpus cache key and ``value --select``'s freshness check name the data by.

Hashing reads every byte (blake2b, about 1 GB/s on one core): a 40 GB corpus costs ~40 s on
rank 0 at every start, resumes included. With a ``cache`` folder the hash is remembered, keyed
by each file's resolved path, size, modification and change times (ns) and inode, so an
unchanged corpus is read once. A write changes the modification time; a file modified within
``RACY_SECONDS`` of being hashed is not remembered (a coarse file-system clock could give a
second write in the same tick the same times), the rule git uses for its index.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from grass_llm.data._textio import visible_files

RACY_SECONDS = 2.0


def content_hash(path: Path, *, cache: Path | None = None) -> tuple[str, int]:
    """Hash (hex) of a file's bytes, or of every visible file's relative path and bytes under a
    directory (sorted); and the bytes hashed. The path itself is not hashed.

    Args:
        path: The corpus file or folder.
        cache: A folder to remember hashes in (see the module docstring); None hashes always.
    """
    path = Path(path)
    files = [(None, path)] if path.is_file() else [(rel, path / rel)
                                                   for rel in sorted(visible_files(path))]
    entry = _entry(path, files, cache) if cache is not None else None
    if entry is not None and entry.is_file():
        try:
            cached = json.loads(entry.read_text())
            return cached["hash"], cached["bytes"]
        except (OSError, ValueError, KeyError):
            pass  # a damaged entry: hash again
    digest, total = hash_files(files)
    newest = max((f.stat().st_mtime for _, f in files), default=0.0)
    if entry is not None and time.time() - newest > RACY_SECONDS:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"hash": digest, "bytes": total, "path": str(path)}))
            tmp.replace(entry)  # atomic: a reader never sees half an entry
        except OSError:
            pass  # a read-only cache only costs the hash next time
    return digest, total


def hash_files(files: list[tuple[str | None, Path]]) -> tuple[str, int]:
    """blake2b of the files' bytes in order (with each relative name and size when given), and
    the bytes read."""
    h = hashlib.blake2b(digest_size=16)
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    total = 0
    for rel, file in files:
        if rel is not None:
            name = rel.encode("utf-8", "surrogatepass")
            h.update(len(name).to_bytes(8, "little") + name
                     + file.stat().st_size.to_bytes(8, "little"))
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
                total += n
    return h.hexdigest(), total


def _entry(path: Path, files: list[tuple[str | None, Path]], cache: Path) -> Path:
    """The cache file of this exact set of file versions."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(path.resolve()).encode("utf-8", "surrogatepass"))
    for rel, file in files:
        st = file.stat()
        h.update(f"|{rel}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
                 .encode("utf-8", "surrogatepass"))
    return cache / f"{h.hexdigest()}.json"


__all__ = ["RACY_SECONDS", "content_hash", "hash_files"]
