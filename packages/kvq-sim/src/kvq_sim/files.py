"""Writing kvq-sim's output files without losing one: check the destination first, write atomically, keep a backup.

A file is written to a temporary file in its own folder and renamed over the destination (os.replace), so a
crash or a failed check leaves either the old file or the new one, never half of each. A file that is
replaced keeps its previous bytes in `<name>.bak` beside it; a write that would not change the bytes does
nothing.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import SimInputError


def backup_path(path: Path) -> Path:
    """Where the previous version of `path` is kept when it is replaced: `<name>.bak` beside it."""
    return path.with_name(path.name + ".bak")


def _nearest_folder(path: Path) -> Path:
    """The deepest existing ancestor of `path` (the folder the missing ones would be created in)."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_destination(path: Path, what: str) -> None:
    """Raise SimInputError unless `path` can receive a file: not a directory or a special file, its folder
    (or the nearest existing ancestor, where the missing folders will be made) a writable directory, and its
    backup name free for a backup. Creating and removing a probe file is the writability test: os.access
    says yes to root on a read-only mount or in /proc."""
    path = Path(path)
    if path.is_dir():
        raise SimInputError(f"{what} {path} is a directory, not a file")
    if path.exists() and not path.is_file():
        raise SimInputError(f"{what} {path} exists and is not a regular file")
    bak = backup_path(path)
    if path.exists() and bak.exists() and not bak.is_file():
        raise SimInputError(f"{what} {path}: its backup {bak} exists and is not a regular file")
    folder = _nearest_folder(path)
    if not folder.is_dir():
        raise SimInputError(f"{what} {path}: {folder} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise SimInputError(f"{what} {path}: cannot write in {folder} ({e.strerror})") from None


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder to write the new file to; on a clean exit it replaces `path`
    (whose previous bytes go to `<name>.bak`), on an exception it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def commit(tmp: Path, path: Path) -> None:
    """Rename the written `tmp` over `path`, keeping `path`'s previous bytes in its backup; when the bytes are
    the same, leave `path` (and its backup) alone."""
    if path.is_file():
        old = path.read_bytes()
        if old == tmp.read_bytes():
            return
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        fd, bak_tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.bak.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(old)
            os.chmod(bak_tmp, path.stat().st_mode & 0o7777)
            os.replace(bak_tmp, backup_path(path))
        except BaseException:
            Path(bak_tmp).unlink(missing_ok=True)
            raise
    else:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a new file gets the usual permissions
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> bool:
    """Write `text` to `path` atomically (see `replacing`); False when the file already held exactly it."""
    path = Path(path)
    if path.is_file() and path.read_bytes() == text.encode("utf-8"):
        return False
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return True
