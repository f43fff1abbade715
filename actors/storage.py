"""Paths and URIs: where a model, an input or an output lives, as a pyarrow
filesystem and a path on it. The one place a flag's path becomes a filesystem."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs

from lmbatch.errors import UserError


def is_uri(path: str) -> bool:
    return "://" in path


def filesystem_of(given: str, flag: str) -> tuple[pafs.FileSystem, str]:
    """A local path (made absolute) or any pyarrow filesystem URI -> (fs, path).

    Raises:
        UserError: naming ``flag`` when the URI cannot be opened.
    """
    if not is_uri(given):
        return pafs.LocalFileSystem(), os.path.abspath(given)
    try:
        return pafs.FileSystem.from_uri(given)
    except (pa.ArrowInvalid, ValueError, OSError) as e:
        raise UserError(flag, f"cannot open {given}: {e}") from None


def absolute(path: str) -> str:
    """A local path made absolute (a job may run in another directory); a URI as is."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)
