"""Atomic output files and content hashes.

Every output is written to a temporary file in the destination folder and renamed
into place, so a crash or Ctrl-C never leaves a half-written model or report, and a
reader never sees a partial file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from harden.errors import HardenError


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `dest`; rename it onto `dest` only on success.

    The temporary file keeps `dest`'s suffix (or `suffix`), because some writers
    (numpy's savez, matplotlib) choose their format from the file name.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=suffix or dest.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; outputs are ordinary files, so honour the umask instead.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_open(dest: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces `dest` when the block ends cleanly."""
    with atomic_path(dest) as tmp, open(tmp, mode) as handle:
        yield handle


def write_json(dest: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_open(dest) as handle:
        json.dump(obj, handle, indent=2, sort_keys=False)
        handle.write("\n")


def refuse_overwrite(inp: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Refuse to write an output over the input model: inputs are never modified."""
    if Path(out).resolve() == Path(inp).resolve():
        raise HardenError(f"refusing to overwrite the input {inp}; choose another output path")


def read_text(path: str | os.PathLike[str], what: str, missing_hint: str = "") -> str:
    """A user's UTF-8 text file, or a one-line HardenError saying why it cannot be read.

    `what` names the file in messages ("descriptions" -> "no such descriptions file").
    """
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise HardenError(f"{path}: no such {what} file{missing_hint}") from err
    except IsADirectoryError as err:
        raise HardenError(f"{path}: is a folder, not a {what} file") from err
    except (OSError, UnicodeDecodeError) as err:
        raise HardenError(f"{path}: cannot read {what} ({err})") from err


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, streamed, for provenance records."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of bytes in memory."""
    return hashlib.sha256(data).hexdigest()
