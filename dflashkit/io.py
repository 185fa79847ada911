"""File primitives every stage shares: atomic writes, crash-safe JSONL, ids that are safe as file names.

Nothing here knows about any stage. The promises: a file that exists under its final name is complete; a JSONL file
read back never yields a torn line; an id turned into a file name cannot escape its directory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .config import UserError

log = logging.getLogger(__name__)
# Every file dflashkit writes (records, markers, checkpoints, exported drafts): readable by all, writable by the
# owner only, whatever the umask (and whatever the library that serialized the bytes would have picked).
FILE_MODE = 0o644


def _fsync_dir(path: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a new file with FILE_MODE and fsync it: for the files of a temp dir that is renamed into place
    as a whole (a checkpoint, an exported draft), where the rename is what makes it atomic."""
    with open(path, "wb") as f:
        os.fchmod(f.fileno(), FILE_MODE)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = FILE_MODE) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def repair_jsonl_tail(path: str | os.PathLike) -> int:
    """Cut a torn last line (a crash mid-append) off a JSONL file. Returns the number of bytes removed.

    A line is torn when it lacks its newline or does not parse. Only the last line can be torn, because lines are
    appended whole and flushed one at a time; a bad line elsewhere is real corruption and is left for the reader to
    report.
    """
    path = Path(path)
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        # Find the start of the last line by scanning back from the end in chunks.
        end = size
        f.seek(size - 1)
        ends_with_newline = f.read(1) == b"\n"
        search_end = size - 1 if ends_with_newline else size
        start = 0
        pos = search_end
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            i = chunk.rfind(b"\n")
            if i >= 0:
                start = pos - step + i + 1
                break
            pos -= step
        f.seek(start)
        last = f.read(end - start)
        if ends_with_newline:
            try:
                json.loads(last)
                return 0
            except ValueError:
                pass
        f.truncate(start)
        f.flush()
        os.fsync(f.fileno())
    log.warning("%s: discarded a torn last line (%d bytes) left by an interrupted write", path, end - start)
    return end - start


class JsonlAppender:
    """Appends one JSON object per line, after repairing a torn tail.

    Each line goes to the OS whole, unbuffered, so killing the process loses nothing already written; the file is
    fsynced on close, before any done-marker can be written. A write that fails (a full disk) cuts the file back to
    its last whole line and raises the OS's error naming the file. A node crash can lose unsynced lines, which a rerun
    regenerates, and tear the last one, which the next open repairs.
    """

    def __init__(self, path: str | os.PathLike, truncate: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not truncate:
            repair_jsonl_tail(self.path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
        self._fd: int | None = os.open(self.path, flags, FILE_MODE)
        os.fchmod(self._fd, FILE_MODE)

    def write(self, obj: Any) -> None:
        line = memoryview((json.dumps(obj, ensure_ascii=False) + "\n").encode())
        end = os.fstat(self._fd).st_size
        try:
            while line:
                line = line[os.write(self._fd, line):]
        except OSError as e:
            os.ftruncate(self._fd, end)  # what did land of this line goes: the file ends with a whole line
            e.filename = e.filename or str(self.path)
            raise

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            except OSError as e:
                e.filename = e.filename or str(self.path)
                raise
            finally:
                os.close(fd)

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield (line_number, object) for each non-blank line; raises ValueError naming the line on bad JSON."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({e})") from e


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
MAX_ID_LEN = 128


def safe_id(raw: str) -> str:
    """Map any id to a string usable as one path component, keeping distinct ids distinct.

    Safe characters pass through unchanged, so clean ids stay readable and stable. Anything else (a '/', '..', NUL,
    spaces, non-ASCII) is replaced by '_' and a short hash of the original is appended: two ids that differ only in
    unsafe characters therefore still map to different names.
    """
    if not isinstance(raw, str) or raw == "":
        raise ValueError(f"id must be a non-empty string, got {raw!r}")
    cleaned = _UNSAFE.sub("_", raw)
    # A leading dot would make hidden files or '.'/'..'; strip it and mark the change.
    changed = cleaned != raw or cleaned.startswith(".") or len(cleaned) > MAX_ID_LEN
    cleaned = cleaned.lstrip(".") or "_"
    if not changed:
        return cleaned
    digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{cleaned[: MAX_ID_LEN - 13]}-{digest}"


def require_local_model(name: str, flag: str) -> None:
    """A model named by a filesystem path (absolute, or starting with ., ~) must be there. HF would take a missing
    one for a hub id and answer that the id is malformed; anything else may be a hub id, left to HF."""
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        raise UserError(f"{flag} {name}: no such file or directory")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
