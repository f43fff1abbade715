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
import sys
from collections.abc import Callable
from importlib import metadata

import click

from lmbatch.errors import UserError, find_user_error
from lmbatch.jobs.options import spec_options
from lmbatch.jobs.spec import InferSpec, OptimizeSpec, ServeSpec

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


# What a bug report needs besides lmbatch's own version.
REPORTED_PACKAGES = (
    "ray",
    "torch",
    "transformers",
    "tokenizers",
    "bitsandbytes",
    "pyarrow",
)


def show_versions(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """``--version``: the versions of lmbatch and its main dependencies, read from
    their package metadata (importing torch to ask it would take seconds)."""
    if not value or ctx.resilient_parsing:
        return
    found = []
    for name in REPORTED_PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    click.echo(f"lmbatch {metadata.version('lmbatch')} ({', '.join(found)})")
    ctx.exit()


@click.group()
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=show_versions,
    help="Show the versions of lmbatch and its main dependencies, then exit.",
)
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
    """What every job command takes to run here or on a cluster (SUBMIT_FLAGS)."""
    command = click.option(
        "--pip",
        multiple=True,
        metavar="REQUIREMENT",
        help="Extra pip requirement for a submitted job; repeatable.",
    )(command)
    command = click.option(
        "--no-wait", is_flag=True, help="Submit and return without following the logs."
    )(command)
    command = click.option(
        "--shared-paths",
        is_flag=True,
        help="Local paths given are on storage every node of the cluster mounts at "
        "the same path; without it, a submission takes URIs only.",
    )(command)
    return address_option(insecure_option(command))


SUBMIT_FLAGS = ("address", "insecure", "no_wait", "pip", "shared_paths")


def launch(kind: str, spec_class: type, flags: dict) -> None:
    """Run the job ``flags`` describe here (or attached to a Ray), or submit it."""
    from lmbatch.jobs.run import run_job
    from lmbatch.jobs.submit import SubmitOptions, is_jobs_address, submit

    address, insecure, no_wait, pip, shared = (flags.pop(k) for k in SUBMIT_FLAGS)
    spec = spec_class.from_command(flags)
    if not is_jobs_address(address):
        given = (("--no-wait", no_wait), ("--pip", pip), ("--shared-paths", shared),
                 ("--insecure", insecure))  # fmt: skip
        for flag, value in given:
            if value:
                raise UserError(
                    flag, "applies to a submission: --address http://HEAD:8265"
                )
        try:
            lines = run_job(kind, spec, address)
        except KeyboardInterrupt:  # Ctrl-C: Ray is stopped; say what is left
            click.echo(f"\n{interrupted(kind, spec.output)}", err=True)
            sys.exit(130)
        click.echo("\n".join(lines))
        return
    options = SubmitOptions(address, insecure, not no_wait, tuple(pip), shared)
    sys.exit(submit(kind, spec, options, click.echo))


def interrupted(kind: str, output: str) -> str:
    """What a job stopped by Ctrl-C leaves, and how to go on: an infer job's rows
    committed (Ray Data's checkpoint, what --resume keeps), counted."""
    if kind != "infer":
        return f"interrupted: no artifact was written to {output}"
    from lmbatch.actors.storage import filesystem_of
    from lmbatch.jobs.resume import CHECKPOINT_DIR, committed_rows

    fs, path = filesystem_of(output, "--output")
    kept = committed_rows(fs, f"{path}/{CHECKPOINT_DIR}")
    if not kept:
        return f"interrupted before a row was written to {output}: run it again"
    return (
        f"interrupted: {kept:,} rows written to {output} are kept; the same command "
        "with --resume (not --overwrite) goes on from them"
    )


@cli.command()
@spec_options(InferSpec)
@click.argument("more_inputs", nargs=-1, metavar="")
@job_options
@user_errors
def infer(more_inputs: tuple[str, ...], **flags) -> None:
    """Run a model over a dataset; write Parquet with an id per input row."""
    if more_inputs and not flags["inputs"]:
        raise UserError("--input", f"{more_inputs[0]} follows no --input")
    flags["inputs"] += more_inputs
    launch("infer", InferSpec, flags)


@cli.command()
@spec_options(OptimizeSpec)
@job_options
@user_errors
def optimize(**flags) -> None:
    """Compress a model by a recipe; measure every step; save a loadable artifact."""
    launch("optimize", OptimizeSpec, flags)


@cli.command()
@spec_options(ServeSpec)
@address_option
@user_errors
def serve(address: str | None, **flags) -> None:
    """Serve a model over HTTP with Ray Serve, batching requests together."""
    from lmbatch.jobs.serve import prepare_serve, run_serve
    from lmbatch.jobs.submit import is_jobs_address

    if is_jobs_address(address):
        raise UserError(
            "--address",
            "serve attaches to a Ray (HOST:6379 or auto); run it on the cluster's head",
        )
    run_serve(prepare_serve(ServeSpec.from_command(flags)), address, click.echo)


@cli.group("jobs")
def jobs_group() -> None:
    """Jobs on a Ray cluster (--address or RAY_ADDRESS): list, status, logs, stop."""


@jobs_group.command("list")
@address_option
@insecure_option
@user_errors
def jobs_list(address: str | None, insecure: bool) -> None:
    """Every job the cluster knows, newest last."""
    from lmbatch.jobs.submit import connect

    found = sorted(
        connect(address, insecure).list_jobs(), key=lambda j: j.start_time or 0
    )
    if not found:  # a silent command reads as a wrong address
        click.echo(f"no jobs on {address}")
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
    from lmbatch.jobs.submit import connect, describe, job_info

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
    from lmbatch.jobs.submit import connect, follow_logs, job_info

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
    from lmbatch.jobs.submit import connect, stop_job

    click.echo(f"{job_id} {stop_job(connect(address, insecure), job_id)}")


def main() -> None:
    cli(prog_name="lmbatch")


if __name__ == "__main__":
    sys.exit(main())
