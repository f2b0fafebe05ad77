"""The one rule for what an mner command may write over, and one-line answers to file-system faults.

Every command that writes (``mner-features extract`` / ``merge``, ``mner-train`` / ``predict``)
checks its output here before it computes anything:

- an existing output is replaced only with ``--overwrite``, and only when it is mner's own kind of
  output: a cache carrying mner's schema attributes, a run folder carrying its marker, a prediction
  file with its ``<out>.json`` record. Never one of the command's inputs, never another program's file;
- the folder that will hold the output exists, is writable, and the names mner derives from the
  output (``<out>.tmp-<host>-<pid>``, ``<out>.lock``, ``<out>.parts``) fit the file system;
- a fault during the write (disk full, read-only file system, a name too long) is reported in one
  line naming the path and the fix (:func:`describe_os_error`), never as a traceback.

The promises and the tests behind them are listed in docs/reliability.md. Imports no torch.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path

RUN_MARKER = "mner-run.json"  # the marker of a run folder (trainer/core/run_folder.py writes it)
REPORT_MARKER = "mner-report.json"  # the marker of a `mner-train report` folder (tables and figures)
PREDICTIONS_RECORD_KEY = "mner_predictions"  # set in the <out>.json record of `mner-train predict`
KINDS = {"cache": "an mner feature cache", "run": "an mner run folder", "predictions": "an mner prediction file",
         "report": "an mner report folder"}
FOLDER_KINDS = ("run", "report")
# The longest suffix mner appends to an output's name: ".tmp-<host>-<pid>" (caches, chunk files).
TEMP_SUFFIX_BYTES = len(f".tmp-{socket.gethostname() or 'unknown-host'}-{4_194_304}") + 8


class OutputError(Exception):
    """An output mner may not write (or cannot), with the fix in the message (one line)."""


# ----------------------------------------------------------------------------- what is mner's own


def is_mner_cache(path: str | os.PathLike) -> bool:
    """An HDF5 file that carries ``mner_schema_version`` (any version: an old cache is still mner's)."""
    try:
        import h5py

        with h5py.File(path, "r") as handle:
            return "mner_schema_version" in handle.attrs
    except Exception:  # not HDF5, truncated, unreadable: not something mner can tell is its own
        return False


def _marked(path: str | os.PathLike, marker_name: str, key: str) -> bool:
    try:
        marker = json.loads((Path(path) / marker_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get(key) == 1


def is_mner_run(path: str | os.PathLike) -> bool:
    return _marked(path, RUN_MARKER, "mner_run")


def is_mner_report(path: str | os.PathLike) -> bool:
    return _marked(path, REPORT_MARKER, "mner_report")


def predictions_record(path: str | os.PathLike) -> Path:
    """``<out>.json``: what `mner-train predict` writes beside its output."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def is_mner_predictions(path: str | os.PathLike) -> bool:
    try:
        record = json.loads(predictions_record(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    # records written before the key existed name the run and the data hash
    return isinstance(record, dict) and (record.get(PREDICTIONS_RECORD_KEY) == 1
                                         or {"run", "data_hash", "posts"} <= set(record))


_IS_MINE = {"cache": is_mner_cache, "run": is_mner_run, "predictions": is_mner_predictions,
            "report": is_mner_report}


# ----------------------------------------------------------------------------- the checks


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def name_limit(folder: str | os.PathLike) -> int:
    """The longest file name (bytes) the file system of ``folder`` accepts."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def check_name_length(path: str | os.PathLike, *, flag: str = "--out", suffix_bytes: int = TEMP_SUFFIX_BYTES) -> None:
    path = Path(path)
    folder = path.parent if path.parent.is_dir() else Path(".")
    limit, length = name_limit(folder), len(os.fsencode(path.name))
    if length + suffix_bytes > limit:
        raise OutputError(
            f"{flag} {path}: the file name is {length} bytes and mner adds up to {suffix_bytes} for its temp and "
            f"lock files; this file system allows {limit}: choose a name of at most {limit - suffix_bytes} bytes"
        )


def check_writable_folder(folder: str | os.PathLike, *, flag: str = "--out", create: bool = False) -> None:
    """The folder exists (or is created when ``create``) and a file can be created in it."""
    folder = Path(folder)
    if not folder.is_dir():
        if folder.exists():
            raise OutputError(f"{flag}: {folder} is a file, not a folder; choose an {flag} inside a folder")
        if not create:
            raise OutputError(f"{flag}: the folder {folder} does not exist; create it (mkdir -p {folder}) "
                              f"or choose an {flag} in an existing folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(describe_os_error(err, folder, flag=flag)) from None
    probe = folder / f".mner-write-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise OutputError(describe_os_error(err, folder, flag=flag)) from None


def check_output(
    path: str | os.PathLike,
    *,
    kind: str,
    overwrite: bool,
    inputs: Iterable[str | os.PathLike] = (),
    flag: str = "--out",
    extend: bool = False,
    create_folder: bool = False,
) -> str:
    """Whether ``path`` may be written as ``kind`` output: returns "new", "replace" (an mner output that
    ``--overwrite`` allows replacing) or "extend" (``extend``: an existing mner cache that gains groups),
    or raises :class:`OutputError` naming the fix. Nothing is written or deleted here."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; valid values: {', '.join(KINDS)}")
    path = Path(path)
    for source in inputs:
        if _same_path(path, Path(source)):
            raise OutputError(f"{flag} {path} is also an input of this command ({source}); mner never writes over "
                              f"its input: choose another {flag}")
    folder_kind = kind in FOLDER_KINDS
    if not folder_kind and path.is_dir():
        example = path / ("features.h5" if kind == "cache" else "predictions.conll")
        raise OutputError(f"{flag} {path} is a folder; name a file, e.g. {flag} {example}")
    check_name_length(path, flag=flag)
    check_writable_folder(path.parent if str(path.parent) else Path("."), flag=flag, create=create_folder)
    if not (path.exists() or path.is_symlink()) or (folder_kind and path.is_dir() and not any(path.iterdir())):
        return "new"
    mine = _IS_MINE[kind](path)
    if not mine:
        why = {"cache": "no mner_schema_version attribute", "run": f"no {RUN_MARKER}", "report": f"no {REPORT_MARKER}",
               "predictions": f"no {predictions_record(path).name} record"}[kind]
        raise OutputError(f"{flag} {path} exists and is not {KINDS[kind]} ({why}); mner never replaces such a "
                          f"file, even with --overwrite: choose another {flag}")
    if overwrite:
        return "replace"
    if extend:
        return "extend"
    raise OutputError(f"{flag} {path} exists; pass --overwrite to replace it, or choose another {flag}")


# ----------------------------------------------------------------------------- faults while writing


def describe_os_error(err: OSError, path: str | os.PathLike | None = None, *, flag: str = "--out") -> str:
    """One line for a file-system fault: the path, what happened, and what to do."""
    where = err.filename if err.filename is not None else path
    where = os.fsdecode(where) if isinstance(where, bytes) else where
    code = err.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (f"{where}: no space left on the device; free some space (or write {flag} to another disk) and run "
                "the same command again: finished work is kept and it continues")
    if code == errno.EROFS:
        return f"{where}: the file system is read-only; choose an {flag} on a writable file system"
    if code in (errno.EACCES, errno.EPERM):
        return f"{where}: permission denied; choose an {flag} in a folder you can write to"
    if code == errno.ENAMETOOLONG:
        return f"{where}: file name too long for this file system; choose a shorter {flag}"
    if code == errno.ENOENT:
        return f"{where}: no such file or folder; check the path (create the folder for {flag} first)"
    if code == errno.EISDIR:
        return f"{where}: is a folder where a file was expected; name a file with {flag}"
    return f"{where}: {err.strerror or err}"


def check_free_space(folder: str | os.PathLike, needed_bytes: int, *, what: str, flag: str = "--out") -> None:
    """Refuse to start a write that cannot fit (HDF5 does not fail cleanly when the disk fills mid-file)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if needed_bytes > free:
        raise OutputError(
            f"{folder}: {what} needs about {needed_bytes / 2**20:.1f} MiB but the disk has {free / 2**20:.1f} MiB "
            f"free; free some space (or write {flag} to another disk) and run the same command again: "
            "finished work is kept"
        )
