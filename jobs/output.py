"""An output directory: the files by which lmbatch knows its own, and the check that
decides, before Ray starts, whether a job may write there.

``--overwrite`` deletes what the output holds, so it replaces only what an lmbatch
job wrote: a typo such as ``--output . --overwrite`` must not empty the working
directory, nor ``--output models/bert`` a model. An infer job writes ``_job.json``
before any row; an optimize job writes ``lmbatch.json`` with its artifact.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs

from lmbatch.actors.artifact import META_FILE
from lmbatch.actors.storage import filesystem_of, is_local
from lmbatch.errors import UserError
from lmbatch.jobs.lease import WRITER_FILE

JOB_FILE = "_job.json"  # an infer job's record, written before its first row
CHECKPOINT_DIR = "_checkpoint"  # Ray Data's; '_' keeps it out of the dataset
SUMMARY_FILE = "_summary.json"  # leading '_': Parquet readers skip it in the output
INFER_MARKERS = (JOB_FILE, SUMMARY_FILE)
OPTIMIZE_MARKERS = (META_FILE,)


def check_output(
    output: str,
    model: str,
    markers: tuple[str, ...],
    overwrite: bool = False,
    resume: bool = False,
) -> tuple[pafs.FileSystem, str]:
    """Refuse an output that is a file, or that is, holds or lies inside the
    ``--model`` directory (--overwrite would delete the model, and a model's
    identity, a resumed job's check, covers all its files). One that holds files is
    refused unless it is an earlier lmbatch output (one of ``markers`` in it) and
    ``--overwrite`` replaces it, or ``--resume`` continues it (``resume.py`` checks
    that it is the same job).

    Raises:
        UserError: naming ``--output``.
    """
    fs, path = filesystem_of(output, "--output")
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.File:
        raise UserError("--output", f"{output} is a file; give a directory")
    _check_apart_from_model(fs, path, output, model)
    if kind == pafs.FileType.NotFound and is_local(fs):
        _check_creatable(path, output)
    if resume or kind != pafs.FileType.Directory:
        return fs, path
    names = _names(fs, path)
    if not names or (JOB_FILE in markers and _record_alone(fs, path, names)):
        return fs, path
    if not set(markers) & set(names):
        raise UserError(
            "--output",
            f"{output} holds files no lmbatch job wrote ({_some(names)}); "
            "--overwrite replaces only an earlier lmbatch output: write elsewhere",
        )
    if not overwrite:
        raise UserError(
            "--output",
            f"{output} already holds files; pass --overwrite to replace them",
        )
    return fs, path


def create_output(fs: pafs.FileSystem, path: str, output: str) -> None:
    """Make the output folder; what the filesystem refuses (a read-only mount, a
    path no folder can be made in) is one line naming --output."""
    try:
        fs.create_dir(path, recursive=True)
    except OSError as e:
        raise UserError("--output", f"cannot create {output}: {e}") from None


def _check_creatable(path: str, output: str) -> None:
    """A local output that does not exist yet can be made: its nearest existing
    folder is a folder, and this process may write there."""
    parent = Path(path).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError("--output", f"cannot create {output}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(
            "--output", f"cannot create {output}: {parent} is not writable by this user"
        )


def holds_output(fs: pafs.FileSystem, path: str) -> bool:
    """Whether the infer output at ``path`` holds anything to protect."""
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return False
    names = _names(fs, path)
    return bool(names) and not _record_alone(fs, path, names)


def _record_alone(fs: pafs.FileSystem, path: str, names: list[str]) -> bool:
    """Whether ``names`` (of the files in ``path``) are the record of an infer job
    that stopped before its first row: a user's mistake found by its tasks, a crash
    while it started. A job may start afresh over it without ``--overwrite``, or
    ``--resume``'s check of the earlier flags: no row is lost."""
    if JOB_FILE not in names or set(names) - {JOB_FILE, CHECKPOINT_DIR, WRITER_FILE}:
        return False
    checkpoint = pafs.FileSelector(
        f"{path}/{CHECKPOINT_DIR}", allow_not_found=True, recursive=True
    )
    return not fs.get_file_info(checkpoint)


def _names(fs: pafs.FileSystem, path: str) -> list[str]:
    held = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(f.base_name for f in held)


def _check_apart_from_model(
    fs: pafs.FileSystem, path: str, output: str, model: str
) -> None:
    model_fs, model_path = filesystem_of(model, "--model")
    if type(model_fs) is not type(fs):
        return
    out, held = f"{path.rstrip('/')}/", f"{model_path.rstrip('/')}/"
    if held.startswith(out) or out.startswith(held):
        where = "holds" if held.startswith(out) else "is inside"
        raise UserError(
            "--output", f"{output} {where} --model {model}: write the output elsewhere"
        )


def _some(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown:,} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
