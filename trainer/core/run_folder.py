"""The run folder: what mner writes, how it is marked, and when it may be replaced or resumed.

A run is written straight into ``--out`` from its first second, with a marker file
(``mner-run.json``) that says it is an mner run and whether it has finished. Every epoch swaps a
complete ``checkpoint/`` in atomically (written as ``checkpoint.tmp/``, then renamed), so a run
killed at any instant can be resumed from its last finished epoch. ``--overwrite`` deletes a
folder only when its marker says mner wrote it.

Layout while training::

    mner-run.json        marker: status "unfinished" | "finished", epochs done, host, pid
    config.json          resolved configs, labels, data and cache provenance, the invocation
    labels.json
    text_encoder/        the encoder's config and tokenizer, no weights (see text_encoder.save_encoder_skeleton)
    checkpoint/          last finished epoch: model, optimiser, scheduler, RNG states, trainer state,
                         the best-so-far weights

and when finished: ``model.safetensors`` (best dev epoch), ``metrics.json``, ``predictions/``
(``checkpoint/`` is removed: it holds the optimiser state, twice the model's size).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from mner.pipeline.hashing import sha256_hex

MARKER = "mner-run.json"
CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.json"  # written last into a checkpoint: its presence means complete


class RunFolderError(Exception):
    """A run folder that cannot be used as asked; the message names the fix."""


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write-then-rename: a reader (or a resumed run) sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(payload, indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("mner_run") == 1 else None


def write_marker(folder: Path, **fields) -> None:
    marker = read_marker(folder) or {"mner_run": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    marker.update(fields, host=socket.gethostname(), pid=os.getpid(), updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_json_atomic(folder / MARKER, marker)


def describe_unfinished(folder: Path, marker: dict) -> str:
    done, total = marker.get("epochs_done", 0), marker.get("epochs", "?")
    written = marker.get("updated", "?")
    return f"{folder} holds an unfinished run ({done} of {total} epochs done, last written {written})"


def check_out(out: Path, *, resume: bool, overwrite: bool) -> str:
    """Check ``--out`` against ``--resume`` / ``--overwrite``: returns "fresh" or "resume", or raises
    RunFolderError with the fix. "fresh" on an existing folder means ``--overwrite`` of a marked mner
    run: the caller deletes it (nothing is deleted here, so every process can call this first)."""
    if resume and overwrite:
        raise RunFolderError("--resume continues a run and --overwrite replaces it: pass one of them")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise RunFolderError(f"--out {out} is a file or a link, not a run folder; choose another --out")
    legacy = sorted(out.parent.glob(f"{out.name}.tmp-*")) if out.parent.is_dir() else []
    if not out.exists() or not any(out.iterdir()):
        if resume:
            hint = f" ({legacy[0]} was left by an older mner that could not resume; delete it)" if legacy else ""
            raise RunFolderError(f"--resume: there is no run in {out} to resume{hint}; drop --resume to start one")
        return "fresh"
    marker = read_marker(out)
    if marker is None:
        raise RunFolderError(
            f"--out {out} exists and is not an mner run folder (no {MARKER}); mner never replaces such a folder, "
            "even with --overwrite: choose another --out"
        )
    finished = marker.get("status") == "finished"
    if resume:
        if finished:
            raise RunFolderError(f"--resume: the run in {out} has already finished; drop --resume and choose "
                                 "another --out, or pass --overwrite to train it again")
        return "resume"
    if overwrite:
        return "fresh"
    if finished:
        raise RunFolderError(f"run folder {out} exists; pass --overwrite to replace it or choose another --out")
    raise RunFolderError(f"{describe_unfinished(out, marker)}; continue it with --resume, "
                         "or start it again with --overwrite")


def require_finished(run_dir: Path) -> None:
    """For evaluate / predict: the folder must be a finished run."""
    marker = read_marker(run_dir)
    if marker is not None and marker.get("status") != "finished":
        raise RunFolderError(f"{describe_unfinished(run_dir, marker)}; finish it first with "
                             f"`mner-train --out {run_dir} --resume`")
    if not (run_dir / "config.json").is_file() or not (run_dir / "model.safetensors").is_file():
        raise RunFolderError(f"{run_dir} is not a finished run (no config.json / model.safetensors); "
                             "train one with mner-train")


def read_run_config(run_dir: Path) -> dict:
    """``config.json`` of a run, or one line saying it is damaged (truncated, not JSON)."""
    path = Path(run_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise RunFolderError(f"{path} is damaged ({type(err).__name__}: {str(err)[:80]}); restore the file from a "
                             "copy or train the run again") from None
    if not isinstance(config, dict) or not {"model", "model_config", "labels"} <= set(config):
        raise RunFolderError(f"{path} is damaged (not a run config: keys missing); restore the file from a copy "
                             "or train the run again")
    return config


# ----------------------------------------------------------------------------- integrity of the weights


def sha256_file(path: Path) -> str:
    return sha256_hex(path)


def verify_weights(run_dir: Path) -> str | None:
    """The sha256 of ``model.safetensors`` checked against the one recorded when the run finished
    (in ``mner-run.json``); returns it, or None for runs written before it was recorded."""
    marker = read_marker(run_dir) or {}
    recorded = marker.get("weights_sha256")
    if recorded is None:
        return None
    weights = Path(run_dir) / "model.safetensors"
    found = sha256_file(weights)
    if found != recorded:
        raise RunFolderError(
            f"{weights} does not match the sha256 recorded when the run finished ({found[:12]}..., recorded "
            f"{recorded[:12]}...): the file is damaged or was replaced; restore it or train the run again"
        )
    return found


# ----------------------------------------------------------------------------- resuming with the stored options


RESUME_MAY_CHANGE = ("device", "num_workers", "track")  # do not change results


def invocation_record(**given) -> dict:
    """What ``train()`` was asked for (absolute paths, given flags only): stored for ``--resume``."""
    inv = dict(given)
    for key in ("data", "features"):
        if inv.get(key) is not None:
            inv[key] = str(Path(inv[key]).resolve())
    inv["sets"] = list(inv.get("sets") or [])
    inv["flags"] = {k: v for k, v in (inv.get("flags") or {}).items() if v is not None}
    encoder = inv["flags"].get("text_encoder")
    if encoder is not None and Path(encoder).expanduser().is_dir():  # a folder: resumable from any directory
        inv["flags"]["text_encoder"] = str(Path(encoder).expanduser().resolve())
    return inv


def options_for_resume(out: Path, given: dict) -> dict:
    """The stored invocation with the options given now on top (only what was given)."""
    try:
        stored = json.loads((out / "config.json").read_text(encoding="utf-8"))["invocation"]
    except (OSError, ValueError, KeyError):
        raise RunFolderError(f"{out} has no readable config.json with the run's options; it cannot be resumed: "
                             "start it again with --overwrite") from None
    merged = dict(stored)
    for key in ("model", "data", "features", "preset", "labels"):
        if given.get(key) is not None:
            merged[key] = given[key]
    if given.get("sets"):
        merged["sets"] = given["sets"]
    merged["flags"] = {**stored.get("flags", {}), **given.get("flags", {})}
    merged["allow_missing_images"] = stored.get("allow_missing_images") or given.get("allow_missing_images")
    return merged


def resume_differences(stored: dict, now: dict) -> list[str]:
    """Result-changing differences between a stored run config and the one resolved now."""
    differ = []
    for section in ("model_config", "train_config"):
        for key in sorted(set(stored[section]) | set(now[section])):
            if key in RESUME_MAY_CHANGE:
                continue
            old, new = stored[section].get(key), now[section].get(key)
            if json.loads(json.dumps(old)) != json.loads(json.dumps(new)):
                differ.append(f"{key} (run: {old!r}, now: {new!r})")
    for key in ("model", "labels"):
        if stored[key] != now[key]:
            differ.append(f"{key} (run: {stored[key]!r}, now: {now[key]!r})")
    if stored["data"]["hash"] != now["data"]["hash"]:
        differ.append(f"data (the files changed since the run started: {now['data']['path']})")
    stored_features, now_features = stored.get("features") or {}, now.get("features") or {}
    if stored_features.get("fingerprint") != now_features.get("fingerprint") and not (
            stored_features.get("image_fingerprints")  # a grown cache: the run's images keep their rows
            and stored_features.get("image_fingerprints") == now_features.get("image_fingerprints")):
        differ.append("features (the cache is another one or has changed)")
    return differ


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_staging(out: Path) -> Path:
    """An empty ``checkpoint.tmp/`` to write the next checkpoint into."""
    staging = out / f"{CHECKPOINT}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def commit_checkpoint(out: Path) -> None:
    """Swap the staged checkpoint in: at every instant ``checkpoint/`` or ``checkpoint.old/`` is complete.
    The previous epoch's checkpoint stays as ``checkpoint.old/`` until the run finishes: when the newest
    is damaged (a disk fault, a truncated copy), ``--resume`` falls back to it."""
    staging, current, old = out / f"{CHECKPOINT}.tmp", out / CHECKPOINT, out / f"{CHECKPOINT}.old"
    if not (staging / STATE_FILE).is_file():
        raise RuntimeError(f"{staging} is incomplete; not committing it")
    if current.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(current, old)
    os.replace(staging, current)


def checkpoint_files(folder: Path) -> dict[str, str]:
    """sha256 of every file of a staged checkpoint (recorded in its trainer state, verified on resume)."""
    return {path.name: sha256_file(path) for path in sorted(folder.iterdir())
            if path.is_file() and path.name != STATE_FILE}


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (None when its state and recorded hashes check out)."""
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"{folder / STATE_FILE} is damaged ({type(err).__name__})"
    for name, recorded in (state.get("files") or {}).items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != recorded:
            return f"{path} does not match its recorded sha256 (damaged)"
    return None


def checkpoint_candidates(out: Path) -> list[Path]:
    """Complete checkpoints, newest first (``checkpoint/``, then the previous epoch's ``checkpoint.old/``)."""
    return [out / name for name in (CHECKPOINT, f"{CHECKPOINT}.old") if (out / name / STATE_FILE).is_file()]


def latest_checkpoint(out: Path) -> Path | None:
    candidates = checkpoint_candidates(out)
    return candidates[0] if candidates else None


def link_or_copy(source: Path, target: Path) -> None:
    """The best weights of an earlier epoch move from checkpoint to checkpoint without rewriting them."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def remove_checkpoints(out: Path) -> None:
    for name in (CHECKPOINT, f"{CHECKPOINT}.tmp", f"{CHECKPOINT}.old"):
        shutil.rmtree(out / name, ignore_errors=True)
