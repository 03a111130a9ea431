"""Output paths checked before the work that fills them (a 50-trial tune, or a sweep's first cell, used
to run in full and then fail to write)."""
from __future__ import annotations

import os
from pathlib import Path


def check_output(path, option: str, folder: bool = False) -> Path:
    """Refuse an output path that the writers could not use, making nothing: a file where a folder is
    wanted (or the reverse), a link to a missing folder on the way, a file above it, no write access.
    The missing folders are left for the writers to make. Returns the path."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file: give a folder")
    if not folder and path.is_dir():
        raise ValueError(f"{option} {path} is a folder: give a file path")
    above = path if folder else path.parent
    while not above.exists() and above != above.parent:
        if above.is_symlink():  # a link to a missing folder: mkdir would fail after the work
            raise ValueError(f"{option} {path}: {above} links to a missing folder")
        above = above.parent
    if not above.is_dir():
        raise ValueError(f"{option} {path}: {above} is a file, not a folder")
    if not os.access(above, os.W_OK) or (not folder and path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{option} {path}: not writable")
    return path
