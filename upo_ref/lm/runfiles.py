"""The files of a run folder: its lock, its metrics log and its checkpoint, written so that a crash
at any moment leaves something a resume can read, and read so that anything else is a clear error.

* ``run.lock``: held (``fcntl.flock``, exclusive) for as long as a process trains in the folder;
  it names the holder (pid, host, command, start time), so a second run on the same folder stops
  at once and says who has it, instead of interleaving its metrics with the first's.
* ``metrics.jsonl``: one JSON object per line, each appended by a single ``write`` of the whole
  line, then flushed and ``fsync``-ed. A crash mid-write can leave only a partial *last* line;
  :func:`repair_metrics` drops that one with a printed warning. Any other unreadable line is an
  error naming file, line and the fix.
* ``checkpoint.pt``: written to ``checkpoint.tmp`` and renamed over the previous one (atomic), so
  a crash or a full disk mid-write leaves the previous checkpoint intact (and no ``.tmp`` behind).

The fix a resume error names is starting that one run over: ``--fresh-run NAME`` on the command
line of ``upo_ref.reproduce``, ``resume=False`` for :func:`upo_ref.lm.train.train`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = [
    "CHECKPOINT",
    "METRICS",
    "LOCK",
    "RunFolderError",
    "RunLockedError",
    "run_lock",
    "start_over_hint",
    "append_record",
    "read_metrics",
    "repair_metrics",
    "write_metrics",
    "save_checkpoint",
    "load_checkpoint",
    "identity_differences",
    "save_state",
    "resume_state",
    "check_no_orphan_metrics",
]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
LOCK = "run.lock"


class RunFolderError(RuntimeError):
    """A run folder that cannot be used or resumed as it is; the message names file and fix."""


class RunLockedError(RunFolderError):
    """Another process holds the run folder's lock."""


def start_over_hint(folder: Path) -> str:
    return (
        f"to start this run over: `--fresh-run {folder.name}` on the command line of "
        f"upo_ref.reproduce, or resume=False in train()"
    )


@contextlib.contextmanager
def run_lock(folder: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if missing) for the ``with`` block.

    Raises RunLockedError naming the holder when another process (or another ``with`` block of this
    one) holds it. The lock file stays in the folder; the operating system releases the lock when
    its holder exits, however it exits (kill -9 included).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    fh = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "(holder unknown)"
            raise RunLockedError(
                f"{folder} is in use by another run: {holder}. Wait for it to finish (or stop it), "
                f"or give this run another output folder"
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(sys.argv),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(holder) + "\n")
        fh.flush()
        yield path
    finally:
        fh.close()  # releases the lock


def append_record(path: Path, record: dict) -> None:
    """Append ``record`` as one line: a single ``write`` of the whole line, then ``fsync``."""
    data = (json.dumps(record) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(errno.ENOSPC, f"only {written} of {len(data)} bytes written")
        os.fsync(fd)
    except OSError as err:
        raise OSError(
            err.errno,
            f"could not append a record to {path} ({err.strerror}); free disk space "
            f"and run the same command again to resume from the last checkpoint",
        ) from err
    finally:
        os.close(fd)


def _parse(path: Path, lines: list[str]) -> list[dict]:
    records = []
    for n, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise RunFolderError(
                f"{path}:{n}: not a metrics record ({err.msg}); {start_over_hint(path.parent)}"
            ) from None
        if not isinstance(record, dict) or "examples_seen" not in record or "split" not in record:
            raise RunFolderError(
                f"{path}:{n}: not a metrics record (no 'split' and 'examples_seen'); "
                f"{start_over_hint(path.parent)}"
            )
        records.append(record)
    return records


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics file; a line that is not a record is an error naming file, line."""
    path = Path(path)
    return _parse(path, path.read_text(encoding="utf-8").splitlines())


def repair_metrics(path: Path) -> list[dict]:
    """The records of a metrics file that a crash may have cut mid-write: a last line without its
    newline or not parseable is left out (with a printed warning naming the file; the caller
    rewrites the file); an unreadable line before the last is an error naming file, line, fix."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    if lines and (not text.endswith("\n") or not _is_json(lines[-1])):
        print(
            f"warning: {path}:{len(lines)}: dropped a partial last record (a crash mid-write): "
            f"{lines[-1][:60]!r}",
            file=sys.stderr,
        )
        lines = lines[:-1]
    return _parse(path, lines)


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def write_metrics(path: Path, records: list[dict]) -> None:
    """Replace the metrics file by ``records``, atomically (a temporary file renamed over it); a
    file that holds exactly these records already is left untouched."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` through ``<path>.tmp`` and an atomic rename. On failure (a full
    disk) the partial temporary file is removed, the previous checkpoint is left as it was, and
    the OSError says so."""
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(state, tmp)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        raise OSError(
            getattr(err, "errno", None) or errno.EIO,
            f"could not write the checkpoint {tmp} ({err}); the previous checkpoint {path} is "
            f"intact. Free disk space and run the same command again to resume from it",
        ) from err
    os.replace(tmp, path)


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """The state saved by :func:`save_checkpoint`; a damaged file is an error naming it and fix."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
        missing = {"model", "optimizer", "examples_seen", "step", "identity"} - set(state)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise RunFolderError(
            f"{path} cannot be read ({type(err).__name__}: {str(err)[:120]}); it is damaged. "
            f"{start_over_hint(path.parent).capitalize()}"
        ) from err
    if missing:
        raise RunFolderError(
            f"{path} is not a checkpoint of upo_ref's trainer (no {sorted(missing)}); "
            f"{start_over_hint(path.parent)}"
        )
    return state


def save_state(path: Path, model, optimizer, examples_seen: int, step: int, identity: dict) -> None:
    """Checkpoint the trainer's whole state: model, optimiser, position, RNG, identity."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "examples_seen": examples_seen,
        "step": step,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "identity": identity,
    }
    save_checkpoint(path, state)


def resume_state(out_dir: Path, model, optimizer, identity: dict, device) -> tuple[int, int, dict]:
    """(examples_seen, step, last eval record) of the checkpoint in ``out_dir``, whose state is
    loaded into model, optimiser and RNG; the metrics file is cut back to the checkpoint."""
    ckpt_path, metrics_path, hint = (
        out_dir / CHECKPOINT,
        out_dir / METRICS,
        start_over_hint(out_dir),
    )
    state = load_checkpoint(ckpt_path, device)
    differ = identity_differences(state["identity"], identity)
    if differ:
        raise RunFolderError(
            f"{ckpt_path} was written by a different run configuration; what differs "
            f"(checkpoint -> this run): {'; '.join(differ)}. Use another output folder, or {hint}"
        )
    if not metrics_path.is_file():
        raise RunFolderError(
            f"{ckpt_path} has no metrics file beside it ({metrics_path} is missing), so the run's "
            f"history is lost and it cannot be resumed; {hint}"
        )
    n = state["examples_seen"]
    records = [r for r in repair_metrics(metrics_path) if r["examples_seen"] <= n]
    evals = [r for r in records if r["split"] == "eval" and r["examples_seen"] == n]
    if not evals:
        raise RunFolderError(
            f"{metrics_path} has no evaluation at examples_seen {n}, where {ckpt_path} was saved: "
            f"the two files are not of one run; {hint}"
        )
    write_metrics(metrics_path, records)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"].cpu())
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return n, state["step"], evals[-1]


def check_no_orphan_metrics(out_dir: Path) -> None:
    """Starting over where there is no checkpoint: refuse if the metrics file shows training that a
    checkpoint should have recorded (it was deleted or moved); a crash before the first checkpoint
    leaves at most the evaluation at 0, which is redone."""
    path = out_dir / METRICS
    if path.is_file():
        seen = max((r["examples_seen"] for r in repair_metrics(path)), default=0)
        if seen > 0:
            raise RunFolderError(
                f"{path} records training up to examples_seen {seen} but {out_dir / CHECKPOINT} is "
                f"missing, so the run cannot be resumed; {start_over_hint(out_dir)}"
            )


_MISSING = "(absent)"


def identity_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``"key.sub: old -> new"`` for every leaf where two nested identity dicts differ."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {str(a)[:70]} -> {str(b)[:70]}")
    return out
