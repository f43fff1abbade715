"""What makes an infer job resumable: Ray Data's checkpointing, and a record of the job.

Ray Data checkpoints every written file's row ids (``CheckpointConfig`` keyed by ``id``,
two-phase: a file whose ids were not committed is deleted on the next run) and, on a
re-run, filters those ids out right after the read. lmbatch adds only ``_job.json``: the
model, task and inputs that wrote the output, so that ``--resume`` never mixes the rows
of two different jobs.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.checkpoint import CheckpointConfig
from ray.data.checkpoint.checkpoint_writer import PENDING_CHECKPOINT_SUFFIX

from lmbatch.actors.model_files import fingerprint
from lmbatch.actors.storage import absolute
from lmbatch.actors.tokenize import default_overlap
from lmbatch.errors import UserError
from lmbatch.jobs.output import CHECKPOINT_DIR, JOB_FILE, create_output, holds_output
from lmbatch.jobs.spec import InferPlan, InferSpec

PENDING_SUFFIX = f"{PENDING_CHECKPOINT_SUFFIX}.parquet"  # ids of an uncommitted file
VERSIONS = "input_versions"  # the record's field of each input's [size, mtime_ns]


def checkpoint_config(plan: InferPlan) -> CheckpointConfig:
    return CheckpointConfig(
        id_column="id",
        checkpoint_path=f"{plan.output_path}/{CHECKPOINT_DIR}",
        override_filesystem=plan.output_fs,
        # Kept after success: --resume of a finished job then recomputes nothing.
        delete_checkpoint_on_success=False,
    )


# Every field of the record that decides a value of the output, and its flag.
RECORD_FLAGS = {
    "model": "--model",
    "model_content": "--model (the content of its files)",
    "task": "--task",
    "precision": "--precision",
    "device": "--device",
    "int8_threshold": "--int8-threshold",
    "inputs": "--input",
    "input_format": "--input-format",
    "input_encoding": "--input-encoding",
    "text_column": "--text-column",
    "pair_column": "--pair-column",
    "id_column": "--id-column",
    "keep_columns": "--keep-columns",
    "max_length": "--max-length",
    "max_new_tokens": "--max-new-tokens",
    "on_long": "--on-long",
    "chunk_overlap": "--chunk-overlap",
    "prompt": "--prompt or --prompt-name",
    "truncate_dim": "--truncate-dim",
    "normalize": "--normalize",
    "embedding_precision": "--embedding-precision",
    "chat_template": "--chat-template",
    "system_prompt": "--system-prompt",
    "sampling": "--temperature, --top-k, --top-p or --seed",
    "stop": "--stop",
}
# What a record written before a field existed held in effect.
RECORD_DEFAULTS = {
    "prompt": "",
    "truncate_dim": None,
    "normalize": False,
    "embedding_precision": "float32",
    "chat_template": False,
    "system_prompt": None,
    "sampling": None,
    "stop": [],
    "pair_column": None,
    "chunk_overlap": None,
    "input_encoding": "utf-8",
}


def job_record(plan: InferPlan, device: str) -> dict:
    """Everything that decides what a row of the output holds: the model by the
    content of its files, and every option that changes a value or a column."""
    spec, sampling = plan.spec, plan.spec.sampling()
    return {
        "model": absolute(spec.model),
        "model_content": fingerprint(plan.model_dir),
        "task": spec.task,
        "precision": spec.precision,
        "device": device,
        "int8_threshold": spec.int8_threshold if spec.precision == "int8" else None,
        "inputs": sorted(plan.inputs.paths),
        "input_format": plan.inputs.format,
        "input_encoding": plan.inputs.encoding,
        "text_column": spec.text_column,
        "pair_column": spec.pair_column,
        "id_column": spec.id_column,
        "keep_columns": [f"{name}:{kind}" for name, kind in plan.keep.items()],
        "max_length": plan.max_length,
        "max_new_tokens": spec.max_new_tokens if spec.task == "generate" else None,
        "on_long": spec.on_long,
        "chunk_overlap": _given_overlap(spec, plan.max_length),
        "prompt": plan.prompt,
        "truncate_dim": spec.truncate_dim,
        "normalize": spec.normalize,
        "embedding_precision": spec.embedding_precision,
        "chat_template": spec.chat_template,
        "system_prompt": spec.system_prompt,
        "sampling": None if sampling is None else asdict(sampling),
        "stop": list(spec.stop),
    }


def begin_output(plan: InferPlan, device: str) -> int:
    """Record a new job, or check that ``--resume`` continues the same one.

    Returns:
        Rows the output already holds (restored, not to be computed again).

    Raises:
        UserError: naming ``--resume`` when the output holds files of no lmbatch job
            or of a different job. An empty or missing output starts afresh, so a
            retry loop may pass ``--resume`` every time.
    """
    fs, path = plan.output_fs, plan.output_path
    record = job_record(plan, device)
    versions = input_versions(plan.inputs.filesystem, plan.inputs.paths)
    if not plan.spec.resume or not holds_output(fs, path):  # a retry's first run
        create_output(fs, path, plan.spec.output)
        _write(fs, f"{path}/{JOB_FILE}", {**record, VERSIONS: versions})
        return 0
    written = recorded_job(fs, path)
    if written is None:
        raise UserError(
            "--resume",
            f"{plan.spec.output} holds files but no lmbatch job to resume "
            f"(no {JOB_FILE})",
        )
    for key, now in record.items():
        then = written.get(key, RECORD_DEFAULTS.get(key))
        if then != now:
            raise UserError(
                "--resume",
                f"{plan.spec.output} was written with another {RECORD_FLAGS[key]}: "
                f"{_change(then, now)}; use a new --output",
            )
    check_versions(plan.spec.output, written.get(VERSIONS), versions)
    check_columns(plan)
    return committed_rows(fs, f"{path}/{CHECKPOINT_DIR}")


def input_versions(fs: pafs.FileSystem, paths: list[str]) -> dict[str, list]:
    """Each input file's size and modification time (ns), from one listing per
    folder: on object storage a request per thousand files, not one per file."""
    wanted, versions = set(paths), {}
    for folder in sorted({p.rpartition("/")[0] or "/" for p in paths}):
        for info in fs.get_file_info(pafs.FileSelector(folder)):
            if info.path in wanted:
                versions[info.path] = [info.size, info.mtime_ns]
    unlisted = [p for p in paths if p not in versions]  # a listing names it otherwise
    for info in fs.get_file_info(unlisted) if unlisted else ():
        versions[info.path] = [info.size, info.mtime_ns]
    return versions


def check_versions(output: str, then: dict | None, now: dict[str, list]) -> None:
    """An input rewritten under its old name (a nightly export, a regenerated
    dataset) is refused: the rows already written were computed from the old file,
    and a row's id is its position (or its --id-column), not its text. A record
    from before lmbatch kept versions checks none.

    Raises:
        UserError: naming ``--resume`` and the first file that changed.
    """
    if then is None:
        return
    for path, version in sorted(now.items()):
        if then.get(path, version) != version:
            raise UserError(
                "--resume",
                f"{output} was written from another version of {path} (then "
                f"{_version(then[path])}, now {_version(version)}); use a new --output",
            )


def _version(version: list) -> str:
    size, mtime_ns = version
    when = "an unknown time"
    if mtime_ns is not None:
        when = datetime.fromtimestamp(mtime_ns / 1e9, UTC).isoformat(" ", "seconds")
    return f"{size:,} bytes of {when}"


def check_columns(plan: InferPlan) -> None:
    """The rows already written have the columns this job writes. The record cannot
    say so for an output an earlier lmbatch wrote with fewer (score's ``is_greedy``
    came later), and one dataset cannot hold both; so the first readable data
    file's schema is read.

    Raises:
        UserError: naming ``--resume`` and the columns that differ.
    """
    fs, path = plan.output_fs, plan.output_path
    wants = set(plan.columns)
    found = fs.get_file_info(pafs.FileSelector(path))
    for data in (f.path for f in found if f.path.endswith(".parquet")):
        try:
            with fs.open_input_file(data) as f:
                names = set(pq.read_schema(f).names)
        except (OSError, pa.ArrowInvalid):  # a file the killed run left half written
            continue
        if names != wants:
            gone, new = sorted(names - wants), sorted(wants - names)
            raise UserError(
                "--resume",
                f"{plan.spec.output} holds rows with other columns (theirs, not "
                f"this job's: {gone}; this job's, not theirs: {new}): an earlier "
                "lmbatch wrote them; use a new --output",
            )
        return


def _change(then: object, now: object) -> str:
    """A changed value for the one-line error; a file list by its count and the first
    file new or gone, not both lists whole (a job may read thousands)."""
    lists = isinstance(then, list) and isinstance(now, list)
    if not lists or len(then) + len(now) <= 4:
        return f"{_shown(then)}, now {_shown(now)}"
    parts = [f"{len(then):,} then, {len(now):,} now"]
    for what, names in (("new", set(now) - set(then)), ("gone", set(then) - set(now))):
        if names:
            more = f" and {len(names) - 1:,} more" if len(names) > 1 else ""
            parts.append(f"{what}: {min(names)}{more}")
    return "; ".join(parts)


def _given_overlap(spec: InferSpec, max_length: int) -> int | None:
    """--chunk-overlap as the record keeps it: None for the task's default, given or
    not, so that spelling the default out changes no job."""
    if spec.on_long != "chunk":
        return None
    default = default_overlap(max_length, continuation=spec.task == "score")
    return None if spec.chunk_overlap == default else spec.chunk_overlap


def _shown(value: object) -> str:
    """A recorded value as the flag was given; None: the flag was not."""
    return "not given" if value is None else repr(value)


def same_model(plan: InferPlan) -> bool:
    """Whether the output's job record names this model's content. Its tokenizer
    then loaded for that job (or, if it failed there, the output held nothing that
    job had not just written)."""
    try:
        written = recorded_job(plan.output_fs, plan.output_path)
    except ValueError:  # a record cut short: --overwrite replaces it all the same
        return False
    if written is None:
        return False
    return written.get("model_content") == fingerprint(plan.model_dir)


def recorded_job(fs: pafs.FileSystem, path: str) -> dict | None:
    """The job record of the output at ``path``; None where it has none."""
    try:
        with fs.open_input_stream(f"{path}/{JOB_FILE}") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def committed_rows(fs: pafs.FileSystem, checkpoint_dir: str) -> int:
    """Rows whose output file Ray Data committed. Not the data files themselves: a
    file the killed run was still writing is there, half written, until Ray Data's
    recovery deletes it when the resumed run starts."""
    committed, _ = checkpoint_files(fs, checkpoint_dir)
    if not committed:
        return 0
    return pads.dataset(committed, filesystem=fs, format="parquet").count_rows()


def checkpoint_files(
    fs: pafs.FileSystem, checkpoint_dir: str
) -> tuple[list[str], list[str]]:
    """(committed, pending): the checkpoint's id files of written data files, and
    those of files a killed run had not finished, which Ray Data's recovery deletes
    with their data when the job runs again."""
    found = fs.get_file_info(pafs.FileSelector(checkpoint_dir, allow_not_found=True))
    ids = [f.path for f in found if f.path.endswith(".parquet")]
    pending = [p for p in ids if p.endswith(PENDING_SUFFIX)]
    return [p for p in ids if p not in pending], pending


def nothing_left(plan: InferPlan, restored: int, input_rows: int | None) -> bool:
    """Whether a --resume has no row to compute: the committed rows are as many as
    the inputs hold (their footers say; not known, the job runs) and no killed run
    left a file to recover. A retry loop that passes --resume every time then does
    not start the pool only to find every row done (on a GPU node: each actor's
    imports and model load). Ids that repeat cannot make it skip a row: a row of a
    finished file is committed once, so missing rows leave the count short."""
    if not plan.spec.resume or input_rows is None or restored < input_rows:
        return False
    checkpoint = f"{plan.output_path}/{CHECKPOINT_DIR}"
    return not checkpoint_files(plan.output_fs, checkpoint)[1]


def _write(fs: pafs.FileSystem, path: str, record: dict) -> None:
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(record, indent=1).encode())
