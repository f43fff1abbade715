"""``lmbatch``: the click launcher.

    lmbatch infer --model DIR --input PATH... --task embed --output DIR [--resume]
    lmbatch optimize --model DIR --recipe RECIPE.yaml --output DIR
    lmbatch serve --model DIR --task embed
    lmbatch jobs list|status|logs|stop          (a cluster's jobs)

``--address http://HEAD:8265`` on infer and optimize submits the same spec to a
cluster through the Ray Jobs API (jobs/submit.py) instead of running it here.

A user's mistake prints one line naming the flag, field or file, and exits 2 with
nothing started; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable

import click

from actors.errors import UserError, find_user_error

os.environ.setdefault(
    "HF_HUB_OFFLINE", "1"
)  # models are local directories; never reach a hub


def user_errors(command: Callable) -> Callable:
    """Turn a UserError, even one raised in a Ray task, into a one-line click error."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - only user errors are reworded
            found = find_user_error(exc)
            if found is None:
                raise
            raise click.ClickException(str(found)) from None

    return wrapper


def parse_actors(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        parts = [int(p) for p in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected MIN or MIN,MAX, got {value!r}") from None
    if len(parts) not in (1, 2):
        raise click.BadParameter(f"expected MIN or MIN,MAX, got {value!r}")
    return (parts[0], parts[-1])


SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> int | None:
    """'2GiB', '512MB', '1e9' -> bytes."""
    if value is None:
        return None
    match = re.fullmatch(r"\s*([0-9.e+]+)\s*([a-zA-Z]*)\s*", value)
    unit = match and match.group(2).lower()
    if not match or unit not in SIZE_UNITS:
        raise click.BadParameter(f"expected a size like 2GiB or 512MB, got {value!r}")
    try:
        return int(float(match.group(1)) * SIZE_UNITS[unit])
    except ValueError:
        raise click.BadParameter(f"expected a size like 2GiB, got {value!r}") from None


def parse_per_gpu(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter(f"expected auto or a whole number >= 1, got {value!r}")
    return int(value)


@click.group()
def cli() -> None:
    """Make language models cheaper to run, then run them over large datasets."""


ADDRESS_HELP = (
    "http(s)://HEAD:8265 submits to a cluster through the Ray Jobs API; "
    "HOST:6379 or auto attaches this process to a running Ray; "
    "default: a fresh embedded local Ray."
)


def address_option(command: Callable) -> Callable:
    return click.option(
        "--address", envvar="RAY_ADDRESS", default=None, help=ADDRESS_HELP
    )(command)


def insecure_option(command: Callable) -> Callable:
    return click.option(
        "--insecure",
        is_flag=True,
        help="Talk to a non-loopback cluster without an auth token (auth off there).",
    )(command)


def job_options(command: Callable) -> Callable:
    """What every job command takes to run here or on a cluster."""
    command = click.option(
        "--pip",
        multiple=True,
        metavar="REQUIREMENT",
        help="Extra pip requirement for a submitted job; repeatable.",
    )(command)
    command = click.option(
        "--no-wait", is_flag=True, help="Submit and return without following the logs."
    )(command)
    return address_option(insecure_option(command))


def launch(kind: str, spec, address, insecure, no_wait, pip) -> None:
    """Run ``spec`` here (or attached to a Ray), or submit it to a cluster."""
    from jobs.run import run_job
    from jobs.submit import SubmitOptions, is_jobs_address, submit

    if not is_jobs_address(address):
        for flag, value in (("--no-wait", no_wait), ("--pip", pip)):
            if value:
                raise UserError(
                    flag, "applies to a submission: --address http://HEAD:8265"
                )
        click.echo("\n".join(run_job(kind, spec, address)))
        return
    options = SubmitOptions(address, insecure, not no_wait, tuple(pip))
    sys.exit(submit(kind, spec, options, click.echo))


@cli.command()
@click.option("--model", required=True, help="Hugging Face model directory.")
@click.option(
    "--input",
    "inputs",
    required=True,
    multiple=True,
    help="File, glob, directory or URI; more may follow it: --input a.csv b.csv",
)
@click.argument("more_inputs", nargs=-1, metavar="")
@click.option(
    "--task",
    required=True,
    type=click.Choice(["embed", "score", "classify", "generate"]),
)
@click.option(
    "--output",
    required=True,
    help="Directory for the Parquet output and _summary.json.",
)
@click.option("--text-column", default="text", show_default=True)
@click.option(
    "--id-column", default=None, help="Column of row ids; default <file>#<row>."
)
@click.option(
    "--input-format",
    type=click.Choice(["parquet", "jsonl", "csv"]),
    default=None,
    help="Default: from the file suffix.",
)
@click.option(
    "--max-length",
    type=int,
    default=None,
    help="Max input tokens; default the model's.",
)
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option(
    "--actors",
    callback=parse_actors,
    default=None,
    metavar="MIN[,MAX]",
    help="Actor pool size; default from the cluster's resources.",
)
@click.option(
    "--batch-rows",
    type=int,
    default=None,
    help="Rows handed to an actor per call; default 1,024 on CPU, 8,192 on GPU.",
)
@click.option(
    "--rows-per-file",
    type=int,
    default=50_000,
    show_default=True,
    help="At least this many rows per output file; each file is a --resume point.",
)
@click.option(
    "--batch-tokens",
    type=int,
    default=None,
    help="Fix the micro-batch token budget instead of adapting it.",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "fp16", "bf16", "int8", "nf4", "cpu-int8"]),
    default="auto",
    show_default=True,
    help="auto: bf16 on GPUs that have it, else fp16; fp32 on CPU. "
    "int8/nf4: bitsandbytes; cpu-int8: torch dynamic int8, fast on CPU.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cuda", "cpu"]),
    default="auto",
    show_default=True,
    help="auto: GPUs where the cluster has them, else CPU.",
)
@click.option(
    "--int8-threshold",
    type=float,
    default=6.0,
    show_default=True,
    help="LLM.int8 outlier threshold (--precision int8).",
)
@click.option(
    "--actor-memory",
    callback=parse_size,
    default=None,
    metavar="SIZE",
    help="Memory per CPU actor, e.g. 2GiB; its batches adapt to it.",
)
@click.option(
    "--actors-per-gpu",
    callback=parse_per_gpu,
    default="auto",
    show_default=True,
    metavar="auto|N",
    help="auto: from the model's measured footprint.",
)
@click.option("--overwrite", is_flag=True, help="Replace what --output holds.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the job that wrote --output: finished rows are kept, not redone.",
)
@click.option(
    "--on-long",
    type=click.Choice(["truncate", "error"]),
    default="truncate",
    show_default=True,
)
@click.option(
    "--trust-remote-code", is_flag=True, help="Run the model directory's own code."
)
@click.option("--allow-pickle", is_flag=True, help="Load pickle (*.bin) weights.")
@job_options
@user_errors
def infer(
    inputs: tuple[str, ...],
    more_inputs: tuple[str, ...],
    address: str | None,
    insecure: bool,
    no_wait: bool,
    pip: tuple[str, ...],
    **flags,
) -> None:
    """Run a model over a dataset; write Parquet with an id per input row."""
    from jobs.spec import InferSpec

    spec = InferSpec(inputs=inputs + more_inputs, **flags)
    launch("infer", spec, address, insecure, no_wait, pip)


@cli.command()
@click.option("--model", required=True, help="Hugging Face model directory.")
@click.option("--recipe", required=True, help="YAML recipe: a list of `steps`.")
@click.option("--output", required=True, help="Directory for the artifact.")
@click.option(
    "--calibration",
    multiple=True,
    help="Text for statistics, training and (a held-out share) evaluation.",
)
@click.option("--eval", "eval_", multiple=True, help="Held-out text for the metrics.")
@click.option("--text-column", default="text", show_default=True)
@click.option(
    "--task",
    type=click.Choice(["embed", "score", "classify"]),
    default=None,
    help="Default: from the architecture (causal LM: score).",
)
@click.option(
    "--max-rows",
    type=int,
    default=4096,
    show_default=True,
    help="Calibration rows read at most.",
)
@click.option("--eval-rows", type=int, default=512, show_default=True)
@click.option(
    "--max-length",
    type=int,
    default=128,
    show_default=True,
    help="Tokens per calibration and evaluation row.",
)
@click.option("--overwrite", is_flag=True, help="Replace what --output holds.")
@job_options
@user_errors
def optimize(
    eval_: tuple[str, ...],
    address: str | None,
    insecure: bool,
    no_wait: bool,
    pip: tuple[str, ...],
    **flags,
) -> None:
    """Compress a model by a recipe; measure every step; save a loadable artifact."""
    from jobs.optimize import OptimizeSpec

    spec = OptimizeSpec(eval=eval_, **flags)
    launch("optimize", spec, address, insecure, no_wait, pip)


@cli.command()
@click.option(
    "--model", required=True, help="Hugging Face model or artifact directory."
)
@click.option(
    "--task", required=True, type=click.Choice(["embed", "score", "classify"])
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "fp16", "bf16", "int8", "nf4", "cpu-int8"]),
    default="auto",
    show_default=True,
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cuda", "cpu"]),
    default="auto",
    show_default=True,
    help="auto: a GPU share per replica where the cluster has GPUs, else CPU.",
)
@click.option(
    "--max-batch-size",
    type=int,
    default=32,
    show_default=True,
    help="Texts per model call, gathered across requests (@serve.batch).",
)
@click.option(
    "--batch-wait-ms",
    type=float,
    default=10.0,
    show_default=True,
    help="How long a batch waits to fill.",
)
@click.option("--max-length", type=int, default=None, help="Max input tokens.")
@click.option("--replicas", type=int, default=1, show_default=True)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to listen on; 0.0.0.0 exposes the model to the network.",
)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option(
    "--trust-remote-code", is_flag=True, help="Run the model directory's own code."
)
@click.option("--allow-pickle", is_flag=True, help="Load pickle (*.bin) weights.")
@address_option
@user_errors
def serve(address: str | None, **flags) -> None:
    """Serve a model over HTTP with Ray Serve, batching requests together."""
    from jobs.serve import ServeSpec, prepare_serve, run_serve
    from jobs.submit import is_jobs_address

    if is_jobs_address(address):
        raise UserError(
            "--address",
            "serve attaches to a Ray (HOST:6379 or auto); run it on the cluster's head",
        )
    run_serve(prepare_serve(ServeSpec(**flags)), address, click.echo)


@cli.group("jobs")
def jobs_group() -> None:
    """Jobs on a Ray cluster (--address or RAY_ADDRESS): list, status, logs, stop."""


@jobs_group.command("list")
@address_option
@insecure_option
@user_errors
def jobs_list(address: str | None, insecure: bool) -> None:
    """Every job the cluster knows, newest last."""
    from jobs.submit import connect

    found = sorted(
        connect(address, insecure).list_jobs(), key=lambda j: j.start_time or 0
    )
    for job in found:
        kind = (job.metadata or {}).get("lmbatch", "-")
        click.echo(
            f"{job.submission_id or job.job_id}  {job.status.value:<9}  {kind:<8}  "
            f"{job.entrypoint[:70]}"
        )


@jobs_group.command("status")
@click.argument("job_id")
@address_option
@insecure_option
@user_errors
def jobs_status(job_id: str, address: str | None, insecure: bool) -> None:
    """A job's status and, when it ended, why."""
    from jobs.submit import connect, describe, job_info

    info = job_info(connect(address, insecure), job_id)
    click.echo(describe(job_id, info))


@jobs_group.command("logs")
@click.argument("job_id")
@click.option("--follow", is_flag=True, help="Keep printing until the job ends.")
@address_option
@insecure_option
@user_errors
def jobs_logs(job_id: str, follow: bool, address: str | None, insecure: bool) -> None:
    """A job's driver output: what `lmbatch infer` would have printed here."""
    from jobs.submit import connect, follow_logs, job_info

    client = connect(address, insecure)
    job_info(client, job_id)  # an unknown id is refused before anything is printed
    if follow:
        sys.exit(follow_logs(client, job_id, click.echo))
    click.echo(client.get_job_logs(job_id), nl=False)


@jobs_group.command("stop")
@click.argument("job_id")
@address_option
@insecure_option
@user_errors
def jobs_stop(job_id: str, address: str | None, insecure: bool) -> None:
    """Stop a job; wait until the cluster says it stopped."""
    from jobs.submit import connect, stop_job

    click.echo(f"{job_id} {stop_job(connect(address, insecure), job_id)}")


def main() -> None:
    cli(prog_name="lmbatch")


if __name__ == "__main__":
    sys.exit(main())
