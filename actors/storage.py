"""Paths and URIs: where a model, an input or an output lives, as a pyarrow
filesystem and a path on it. The one place a flag's path becomes a filesystem."""

from __future__ import annotations

import functools
import os

import pyarrow as pa
import pyarrow.fs as pafs
import yaml

from lmbatch.errors import UserError

GCS_PROBE_SECONDS = 5  # how long the first request to a gs:// URI may retry


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
        found = pafs.FileSystem.from_uri(given)
    except (pa.ArrowInvalid, ValueError, OSError) as e:
        raise UserError(flag, f"cannot open {given}: {e}") from None
    if isinstance(found[0], pafs.GcsFileSystem):
        _check_reachable(given, flag)
    return found


@functools.lru_cache(maxsize=64)
def _check_reachable(given: str, flag: str) -> None:
    """One request to Google Cloud Storage that gives up in seconds: without
    credentials (or a network), pyarrow's client retries its token lookup for
    minutes on every call (a job still silent when killed at 120 s). The job's own
    filesystem keeps those retries, which ride out a transient error mid-read.

    Raises:
        UserError: naming ``flag``, with the client's reason.
    """
    sep = "&" if "?" in given else "?"
    fs, path = pafs.FileSystem.from_uri(
        f"{given}{sep}retry_limit_seconds={GCS_PROBE_SECONDS}"
    )
    try:
        fs.get_file_info(path)
    except OSError as e:
        reason = str(e).splitlines()[0]
        reason = reason.split("last message of ", 1)[-1].split(". ")[0]
        if "access token" in reason:  # no credentials here
            reason += " (gcloud auth application-default login; or ?anonymous=true)"
        raise UserError(flag, f"cannot reach {given}: {reason}") from None


def read_yaml(given: str, flag: str) -> object:
    """A YAML file a user wrote (``--spec``, ``--recipe``), local or a URI,
    safe-loaded: data, never code.

    Raises:
        UserError: naming ``flag``, in one line: no such file, one that cannot be
            read, or not YAML (the line and what is wrong there).
    """
    fs, where = filesystem_of(given, flag)
    try:
        with fs.open_input_stream(where) as f:
            return yaml.safe_load(f.read().decode())
    except FileNotFoundError:
        raise UserError(flag, f"no such file: {given}") from None
    except OSError as e:
        reason = e.strerror or str(e).splitlines()[0]
        raise UserError(flag, f"cannot read {given}: {reason}") from None
    except UnicodeDecodeError:
        raise UserError(flag, f"{given} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(flag, f"{given} is not valid YAML{at}: {problem}") from None


def absolute(path: str) -> str:
    """A local path made absolute (a job may run in another directory); a URI as is."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)
