"""A results folder as one writer's property: the scan lock and the run's own stamp.

:func:`writer` holds an exclusive lock on ``<folder>/.headwise.lock`` for a whole scan (``flock``:
the kernel drops it when the holder dies, even by SIGKILL). A second writer is refused with the
holder's pid and command; a lock file left by a dead process is taken over with a notice, and
the temporary files of its interrupted writes are removed.

``<folder>/run.json`` stamps what the folder's result (``summary.json`` and its files) was made
from: the analysis, the model's weights hash and every setting. A scan into a folder stamped
with another analysis, model or settings is refused with the fix (another ``--out``, or
``force=True`` / ``--force`` to replace that result: units whose own stamps still match are
reused, the rest recomputed). A folder that is neither empty nor a headwise results folder is
never written into.

>>> import tempfile
>>> folder = tempfile.mkdtemp()
>>> with writer(folder, "scan demo"):
...     claim(folder, {"analysis": "demo", "model": "abc", "settings": {"k": 2}})
...     try:
...         claim(folder, {"analysis": "demo", "model": "abc", "settings": {"k": 3}})
...     except FolderInUseError as exc:
...         print(str(exc).split(": use")[0].split(" holds ")[1])
a demo result made with other settings (k: 2 there, 3 now)
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from probe.atomic import read_json, write_json
from probe.errors import CorruptFileError, HeadwiseError, InputError

LOCK = ".headwise.lock"
RUN = "run.json"
FORMAT = "headwise.run"
VERSION = 1
OURS = {LOCK, RUN, "summary.json", "units", "figures"}   # any of these: a headwise results folder


class FolderLockedError(HeadwiseError):
    """Another live process is writing into the results folder."""


class FolderInUseError(InputError):
    """The results folder holds another run (other analysis, model or settings) or other files."""


def check_output_folder(folder: str | Path, flag: str = "--out") -> Path:
    """``folder`` usable as a results folder, checked before any work: a non-empty path that is not a
    file, whose nearest existing ancestor is a writable folder."""
    if str(folder).strip() == "":
        raise InputError(f"{flag} is empty: name a results folder, e.g. {flag} results/run1")
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {str(folder)!r} is a file, not a folder: name a folder (it is created)")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{flag} {str(folder)!r}: {probe} is a file, so the folder cannot be created")
    try:                                          # a real write: os.access is always yes for root
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise InputError(f"{flag} {str(folder)!r}: cannot write in {probe} ({exc.strerror or exc}): choose a "
                         "folder you can write") from None
    return path


@contextmanager
def writer(folder: str | Path, command: str | None = None) -> Iterator[Path]:
    """Hold ``folder``'s writer lock for the body (see the module docstring)."""
    folder = Path(folder)
    _check_ours(folder)                                 # before the lock file: never leave one in a foreign folder
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderLockedError(_held_message(folder, _holder(fd))) from None
        old = _holder(fd)
        if old.get("pid"):
            print(f"headwise: {folder}: taking over the lock of process {old['pid']} ({old.get('command', '?')}), "
                  "which ended without releasing it; its finished units are kept", file=sys.stderr)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or " ".join(sys.argv),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        _sweep(folder)
        try:
            yield folder
        finally:
            os.ftruncate(fd, 0)                         # released cleanly: no holder to report
    finally:
        os.close(fd)                                    # closing drops the flock


def _sweep(folder: Path) -> None:
    """Remove the temporary files of interrupted atomic writes (only a dead writer can have left them:
    we hold the lock)."""
    left = [p for p in [*folder.glob(".*.tmp"), *(folder / "units").rglob(".*.tmp"), *(folder / "figures").glob(".*.tmp")]
            if p.is_file()]
    for p in left:
        p.unlink(missing_ok=True)
    if left:
        print(f"headwise: {folder}: removed {len(left)} temporary file(s) of an interrupted write", file=sys.stderr)


def _holder(fd: int) -> dict:
    try:
        d = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
        return d if isinstance(d, dict) else {}
    except (ValueError, OSError):
        return {}


def _held_message(folder: Path, holder: dict) -> str:
    who = f"process {holder.get('pid', '?')} ({holder.get('command', 'unknown command')}, since " \
          f"{holder.get('since', '?')})"
    return (f"{folder} is being written by {who}: wait for it to finish, stop it, or use another --out")


# ----------------------------------------------------------------------------- the run's stamp

def run_stamp(analysis, model, config) -> dict:
    """What a folder's result is made from: analysis, model (id and weights hash) and all settings."""
    return {"analysis": analysis.name, "model": model.weights_hash,
            "model_id": model.model_id, "settings": config.to_dict()}


def claim(folder: str | Path, stamp: dict, force: bool = False) -> None:
    """Make ``folder`` this run's (call under :func:`writer`): refuse another run's folder unless ``force``."""
    folder, stamp = Path(folder), {"format": FORMAT, "version": VERSION, **stamp}
    try:
        old = read_stamp(folder)
    except FolderInUseError:
        if not force:
            raise
        old = {}
    if old is None:
        _check_ours(folder)
    elif not force:
        differ = _differences(old, stamp)
        if differ:
            raise FolderInUseError(f"{folder} holds a {old.get('analysis')} result made with {differ}: "
                                   "use another --out, or --force to replace that result (units whose settings "
                                   "still match are reused)")
    write_json(folder / RUN, stamp)


def _check_ours(folder: Path) -> None:
    """Refuse a folder that holds files but nothing of headwise's (``--out ~`` must not fill a home folder)."""
    if not folder.is_dir() or any((folder / n).exists() for n in OURS):
        return
    foreign = sorted(p.name for p in folder.iterdir())
    if foreign:
        raise FolderInUseError(f"{folder} is not a headwise results folder (it holds {foreign[:3]}"
                               f"{' ...' if len(foreign) > 3 else ''}): choose an empty or new folder for --out")


def read_stamp(folder: str | Path) -> dict | None:
    """The folder's run stamp, None when there is none; an unreadable one is a :class:`FolderInUseError`."""
    path = Path(folder) / RUN
    if not path.exists():
        return None
    try:
        d = read_json(path, "run stamp")
    except CorruptFileError as exc:
        raise FolderInUseError(f"{exc}; or rerun with --force to replace it") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise FolderInUseError(f"{path} is not a headwise run stamp: use another --out, or --force to replace it")
    return d


def _differences(old: dict, new: dict) -> str:
    if old.get("analysis") != new["analysis"]:
        return f"another analysis ({old.get('analysis')!r} there, {new['analysis']!r} now)"
    if old.get("model") != new["model"]:
        return f"another model ({old.get('model_id')} weights {old.get('model')} there, {new['model_id']} " \
               f"weights {new['model']} now)"
    a, b = old.get("settings") or {}, new["settings"]
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))   # a field new to the config differs too
    if not keys and old.get("version") == new["version"]:
        return ""
    shown = ", ".join(f"{k}: {_short(a.get(k))} there, {_short(b.get(k))} now" for k in keys[:4])
    return f"other settings ({shown or 'another stamp version'}{' ...' if len(keys) > 4 else ''})"


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."
