"""Atomic file output: every file the pipeline writes goes to a temporary name in the same folder,
is flushed and fsync'ed, and is renamed into place, and the folder's entry is fsync'ed too, so a reader
(or a resumed run) sees either the complete file or none, whatever happens to the process (kill -9, disk
full, exception) or, once the call has returned, to the machine (power cut)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["atomic_write", "atomic_dir", "write_json", "read_json", "save_png", "save_torch", "cache_dir", "fsync_dir"]


def fsync_dir(path) -> None:
    """Make a folder's entries (a rename into it) durable; best effort where folders cannot be opened."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Call ``write(fh)`` on a temporary file beside ``path``, fsync it and rename it to ``path``.

    On any error the temporary file is removed and ``path`` is left as it was (absent or the old
    complete file); the error propagates (e.g. ``OSError(ENOSPC)`` when the disk is full).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_dir(path) -> Iterator[Path]:
    """A folder published whole: yields a temporary folder beside ``path`` to fill; on success its files are
    fsync'ed and it is renamed to ``path`` (atomic); on an error it is removed. If ``path`` appeared
    meanwhile (another process published it first), raises ``FileExistsError`` and removes the temporary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # as mkdir would make it (mkdtemp's is private to the owner)
    try:
        yield tmp
        for f in tmp.rglob("*"):  # durable before the rename publishes the folder
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if path.exists():
                raise FileExistsError(f"{str(path)!r} was published by another process meanwhile") from None
            raise
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path, obj) -> Path:
    data = (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()
    return atomic_write(path, lambda fh: fh.write(data))


def read_json(path, what: str = "file") -> dict:
    """Parse a JSON file; a missing file raises FileNotFoundError, an unreadable one ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {str(path)!r} is unreadable: {exc}") from None


def save_png(path, image_uint8_hwc) -> Path:
    """Write an ``[H, W, 3]`` uint8 array as a PNG, atomically."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_uint8_hwc).save(buf, format="PNG")
    data = buf.getvalue()
    return atomic_write(path, lambda fh: fh.write(data))


def save_torch(path, obj) -> Path:
    import torch

    return atomic_write(path, lambda fh: torch.save(obj, fh))


def cache_dir() -> Path:
    """``$RETA_FAST_CACHE`` or ``~/.cache/reta_fast``."""
    return Path(os.environ.get("RETA_FAST_CACHE", Path.home() / ".cache" / "reta_fast"))
