"""One run per output dir: `_lock.json` names the holder and holds a lease it renews.

See `OutputLock`. No Ray here.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import suppress
from typing import Any

import pyarrow.fs as pa_fs

from .fs import TMP_PREFIX, delete, join, write_atomic
from .objectstore import create_if_absent, read_with_tag, replace_if_unchanged
from .output import LOCK_FILE, OutputDir

log = logging.getLogger(__name__)


class OutputLock:
    """One run per output dir: `_lock.json` names the holder (host, pid, job, start) and holds a
    lease the holder renews every lease_s / 3 from a background thread. Another run is refused
    while the lease is fresh; a lock whose lease expired (its driver died), or whose holder was
    a process of this host that no longer exists, is taken over. On a local file system the lock
    is created exclusively (written whole, then hard-linked into place, so no reader sees it
    half-written); on S3 with a conditional write (`If-None-Match: *` to create, `If-Match` on
    the ETag read to take over or renew: two runs never both win); on other object stores it
    is read-check-write, and the run says so."""

    def __init__(self, out: OutputDir, job: str, lease_s: float = 60.0):
        self.out, self.lease_s = out, lease_s
        self.token = uuid.uuid4().hex
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "job": job,
                   "token": self.token, "started_at": time.time(), "lease_s": lease_s}  # fmt: skip
        self.lost: str | None = None  # set when another run took the lock over
        self.uri = join(out.uri, LOCK_FILE)
        self._tag: str | None = None  # the lock object's ETag as last read or written (S3)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        self.out.fs.create_dir(self.out.root, recursive=True)
        path = self.out.join(LOCK_FILE)
        holder = self._read()
        if holder is not None and not self._stale(holder):
            raise RuntimeError(self._busy(holder))
        if holder is not None:
            log.warning("taking over the lock of a run that is gone: %s", _who(holder))
        self._write(exclusive=holder is None)
        if (self._read() or {}).get("token") != self.token:  # lost a race for a stale lock
            raise RuntimeError(self._busy(self._read() or {}))
        self._thread = threading.Thread(target=self._renew_loop, daemon=True, name="lock-lease")
        self._thread.start()
        log.debug("locked %s", path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if (self._read() or {}).get("token") == self.token:
            delete(self.out.fs, self.out.join(LOCK_FILE))

    def _renew_loop(self) -> None:
        failing = False  # a renewal that cannot be written (full disk, storage hiccup) is
        # retried at the next interval; the thread never dies of it (an unrenewed lease would
        # let another run in while this one still writes)
        while not self._stop.wait(self.lease_s / 3):
            try:
                holder = self._read()
                if (holder or {}).get("token") != self.token:
                    self.lost = f"another run took over the lock of {self.out.uri}: {_who(holder)}"
                    log.error("%s", self.lost)
                    return
                self._write(exclusive=False)
            except RuntimeError:  # S3: the lock changed since it was read (taken over)
                self.lost = f"another run took over the lock of {self.out.uri}"
                log.error("%s", self.lost)
                return
            except OSError as e:
                if not failing:
                    log.warning("cannot renew the lock of %s (%s); retrying", self.out.uri, e)
                failing = True
            else:
                failing = False

    def busy(self) -> str | None:
        """Why a run could not take the lock now (another run holds it), or None. Reads only."""
        holder = self._read()
        return self._busy(holder) if holder and not self._stale(holder) else None

    def _read(self) -> dict[str, Any] | None:
        try:
            if (tagged := read_with_tag(self.uri)) is not None:  # S3: the ETag with the bytes
                data, self._tag = tagged
                holder = json.loads(data) if data else None
            else:
                holder = self.out.read_json(LOCK_FILE)
        except ValueError:  # half-written by a crashed writer: no valid holder
            return {"host": "?", "pid": -1, "job": "?", "renewed_at": 0, "lease_s": 0}
        return holder if isinstance(holder, dict) else None

    def _stale(self, holder: dict[str, Any]) -> bool:
        if time.time() > holder.get("renewed_at", 0) + holder.get("lease_s", 0):
            return True
        if holder.get("host") == socket.gethostname():  # a dead process of this host
            try:
                os.kill(int(holder.get("pid", -1)), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, OverflowError):
                return False
        return False

    def _busy(self, holder: dict[str, Any]) -> str:
        left = holder.get("renewed_at", 0) + holder.get("lease_s", 0) - time.time()
        return (
            f"output dir {self.out.uri} is in use by another run ({_who(holder)}); its lease "
            f"expires in {max(left, 0):.0f}s unless renewed. Wait for that run, or use another "
            "output.path"
        )

    def _write(self, exclusive: bool) -> None:
        data = json.dumps({**self.me, "renewed_at": time.time()}, indent=2).encode()
        path = self.out.join(LOCK_FILE)
        if exclusive and isinstance(self.out.fs, pa_fs.LocalFileSystem):
            # written whole under a temp name, then linked into place: link fails if the lock
            # exists, and no reader ever sees a half-written lock (an O_EXCL create would show
            # an empty file until its write, which a reader must take for a crashed holder)
            # (the temp name is one clean_temp removes should this process die in between; a
            # holder's clean_temp removing it means the dir is held: busy as well)
            tmp = self.out.join(f"{TMP_PREFIX}{LOCK_FILE}-{self.token}")
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                _link_exclusive(tmp, path, data)
            except (FileExistsError, FileNotFoundError):
                raise RuntimeError(self._busy(self._read() or {})) from None
            finally:
                with suppress(FileNotFoundError):
                    os.unlink(tmp)
            return
        if exclusive or not self._tag:
            tag = create_if_absent(self.uri, data)
        else:
            tag = replace_if_unchanged(self.uri, data, self._tag)
        if tag == "":  # another run created or replaced it first
            raise RuntimeError(self._busy(self._read() or {}))
        if tag is None and not isinstance(self.out.fs, pa_fs.LocalFileSystem):
            _warn_read_check_write(self.uri)
        if tag is None:
            write_atomic(self.out.fs, path, lambda sink: sink.write(data))
        self._tag = tag


@functools.cache
def _warn_read_check_write(uri: str) -> None:
    log.warning("the output lock at %s is read-check-write (no conditional create on this store "
                "here; S3 has one with boto3 installed): two runs started at the same instant "
                "could both proceed", uri.split("?", 1)[0])  # fmt: skip


def _link_exclusive(tmp: str, path: str, data: bytes) -> None:
    """`path` created from `tmp` only if absent (FileExistsError otherwise). A file system
    without hard links (some network mounts) gets an exclusive create, then the write."""
    try:
        os.link(tmp, path)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def _who(holder: dict[str, Any] | None) -> str:
    h = holder or {}
    started = h.get("started_at")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)) if started else "?"
    return f"host {h.get('host')}, pid {h.get('pid')}, job {h.get('job')}, started {when} UTC"
