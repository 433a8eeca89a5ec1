"""Writing outputs without losing anything: atomic files, output guards, free disk space.

Every command that writes goes through these helpers, so the rules hold everywhere:

* a file is written to a temporary name in the same folder and renamed onto its final name
  (:func:`atomic_path`), so a reader never sees half a file, an interrupted write leaves the old
  file as it was, and no temporary is left behind when the write fails;
* a command refuses an output that holds anything it would overwrite unless told to replace it
  (:func:`check_outputs`, ``--force``) or to continue it (``--resume``);
* a long run checks that the disk can hold what it will write before its first step
  (:func:`require_free_space`).

This module imports nothing from bridgeta: every layer may use it.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


class OutputExistsError(FileExistsError):
    """An output holds files the command would overwrite; the message names them and the flag."""


class DiskSpaceError(OSError):
    """Not enough free space for what a command is about to write."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path``: renamed onto ``path`` on success, deleted on error.

    The caller writes the whole file to the yielded path (any writer that takes a file name).
    The temporary is a hidden, unique sibling (same filesystem, so the rename is atomic).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    temporary = Path(name)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException as exc:
        temporary.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            # A writer's bare "[Errno 28] No space left on device": say which file it was writing.
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def existing_outputs(directory: str | Path, names: Iterable[str]) -> list[Path]:
    """Those of ``directory/name`` that exist (broken links included)."""
    directory = Path(directory)
    return [directory / name for name in names if os.path.lexists(directory / name)]


def check_outputs(directory: str | Path, names: Iterable[str], force: bool, hint: str = "") -> list[Path]:
    """Refuse ``directory`` when it holds any of ``names`` and not ``force``; returns those it holds.

    ``hint`` says how else to proceed (e.g. "resume it with --resume"); ``--force`` is always named.
    """
    found = existing_outputs(directory, names)
    if found and not force:
        listed = ", ".join(path.name for path in found[:6]) + (" ..." if len(found) > 6 else "")
        other = f"{hint}, " if hint else ""
        raise OutputExistsError(
            f"{directory} already holds {listed}: {other}pass --force to replace them, or choose another "
            "output (nothing was changed)"
        )
    return found


def remove_paths(paths: Iterable[str | Path]) -> None:
    """Delete files and folders (what ``--force`` replaces)."""
    for path in map(Path, paths):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()


def require_free_space(directory: str | Path, needed: int, what: str) -> None:
    """Raise :class:`DiskSpaceError` when the filesystem of ``directory`` has under ``needed`` bytes free."""
    probe = Path(directory).absolute()
    while not probe.exists() and probe != probe.parent:  # the run folder may not exist yet
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise DiskSpaceError(
            errno.ENOSPC,
            f"{probe} has {free / 1e6:.0f} MB free, {what} needs about {needed / 1e6:.0f} MB: free some space "
            "or choose another output",
        )
