"""The corpus cache's folders: a finished build renamed into place, and the leftovers of killed
builds removed (see ``corpus``: a folder is built under a temporary name, so a killed build
never leaves a folder that is trusted)."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from collections.abc import Callable
from pathlib import Path


def commit(tmp: Path, folder: Path, complete: Callable[[Path], bool]) -> None:
    """Renames the built ``tmp`` to ``folder`` (atomic); a damaged ``folder`` (not
    ``complete``) is replaced, one that another build completed meanwhile is kept."""
    if folder.exists() and not complete(folder):
        trash = folder.with_name(f".{folder.name}.damaged-{secrets.token_hex(4)}")
        folder.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        tmp.rename(folder)
    except OSError:
        if not complete(folder):
            raise


def remove_stale(root: Path) -> None:
    """Removes build folders left by killed builds on this host (their process is gone; those
    of other hosts are left alone: they may be running, and are never read) and damaged
    folders set aside by ``commit``."""
    host = socket.gethostname()
    for entry in root.glob(".*.tmp-*@*"):
        base, _, entry_host = entry.name.rpartition("@")
        try:
            pid = int(base.rsplit(".tmp-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if entry_host == host and not _alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
    for entry in root.glob(".*.damaged-*"):
        shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
