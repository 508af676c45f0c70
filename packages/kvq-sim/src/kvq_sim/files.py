"""Writing kvq-sim's output files without losing one: check the destination first, write atomically, keep a backup.

A file is written to a temporary file in its own folder and renamed over the destination (os.replace), so a
crash or a failed check leaves either the old file or the new one, never half of each. A file that is
replaced keeps its previous bytes in a backup beside it: `<name>.bak`, or where that name is taken (an earlier
backup, or any file of the user's), `<name>.<n>.bak` numbered past the highest one there, so no existing file is
ever replaced or removed; a write that would not change the bytes does nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import SimInputError


def backup_path(path: Path) -> Path:
    """The first backup name of `path`: `<name>.bak` beside it (see `next_backup`)."""
    return path.with_name(path.name + ".bak")


def _backups(path: Path) -> dict[int, Path]:
    """Existing backup names of `path` by number (`<name>.bak` is 0, `<name>.<n>.bak` is n), files or not."""
    path = Path(path)
    pattern = re.compile(re.escape(path.name) + r"(?:\.(\d+))?\.bak")
    found = {}
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            m = pattern.fullmatch(entry.name)
            if m:
                found[int(m.group(1) or 0)] = entry
    return found


def next_backup(path: Path) -> Path:
    """Where `path`'s previous bytes go when it is replaced: `<name>.bak` when no backup name exists, else
    `<name>.<n>.bak` with n one past the highest taken (existing files are never overwritten)."""
    taken = _backups(path)
    if not taken:
        return backup_path(Path(path))
    return Path(path).with_name(f"{Path(path).name}.{max(taken) + 1}.bak")


def latest_backup(path: Path) -> Path | None:
    """The highest-numbered existing backup of `path` (the one its last replacement wrote), or None."""
    taken = _backups(path)
    return taken[max(taken)] if taken else None


def _nearest_folder(path: Path) -> Path:
    """The deepest existing ancestor of `path` (the folder the missing ones would be created in)."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_destination(path: Path, what: str) -> None:
    """Raise SimInputError unless `path` can receive a file: not a directory or a special file, its folder
    (or the nearest existing ancestor, where the missing folders will be made) a writable directory. Creating
    and removing a probe file is the writability test: os.access says yes to root on a read-only mount or in
    /proc."""
    path = Path(path)
    if path.is_dir():
        raise SimInputError(f"{what} {path} is a directory, not a file")
    if path.exists() and not path.is_file():
        raise SimInputError(f"{what} {path} exists and is not a regular file")
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
    (whose previous bytes go to `next_backup(path)`), on an exception it is removed and `path` is untouched."""
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
    """Rename the written `tmp` over `path`, keeping `path`'s previous bytes in a new backup (`next_backup`);
    when the bytes are the same, leave `path` (and its backups) alone."""
    if path.is_file():
        old = path.read_bytes()
        if old == tmp.read_bytes():
            return
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        bak = next_backup(path)
        # O_EXCL: a name that appeared since next_backup looked is an error, never overwritten
        fd = os.open(bak, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, path.stat().st_mode & 0o7777)
            with os.fdopen(fd, "wb") as f:
                f.write(old)
        except BaseException:
            bak.unlink(missing_ok=True)
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
