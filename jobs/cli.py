"""``lmbatch``: the click launcher.

    lmbatch infer --model DIR --input PATH... --task embed --output DIR

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

from actors.errors import find_user_error

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
@click.option(
    "--address",
    envvar="RAY_ADDRESS",
    default=None,
    help="Ray cluster to run on; default: a fresh embedded local Ray.",
)
@click.pass_context
def cli(ctx: click.Context, address: str | None) -> None:
    """Make language models cheaper to run, then run them over large datasets."""
    ctx.obj = {"address": address}


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
    default=1024,
    show_default=True,
    help="Rows handed to an actor per call.",
)
@click.option(
    "--batch-tokens",
    type=int,
    default=None,
    help="Fix the micro-batch token budget instead of adapting it.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "bf16", "int8", "nf4", "cpu-int8"]),
    default="fp32",
    show_default=True,
    help="int8/nf4: bitsandbytes; cpu-int8: torch dynamic int8, fast on CPU.",
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
    "--on-long",
    type=click.Choice(["truncate", "error"]),
    default="truncate",
    show_default=True,
)
@click.option(
    "--trust-remote-code", is_flag=True, help="Run the model directory's own code."
)
@click.option("--allow-pickle", is_flag=True, help="Load pickle (*.bin) weights.")
@click.pass_context
@user_errors
def infer(
    ctx: click.Context, inputs: tuple[str, ...], more_inputs: tuple[str, ...], **flags
) -> None:
    """Run a model over a dataset; write Parquet with an id per input row."""
    from jobs.infer import run_infer
    from jobs.spec import InferSpec, prepare_infer

    plan = prepare_infer(InferSpec(inputs=inputs + more_inputs, **flags))
    summary = run_infer(plan, ctx.obj["address"])
    click.echo("\n".join(summary.lines()))


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
@click.pass_context
@user_errors
def optimize(ctx: click.Context, eval_: tuple[str, ...], **flags) -> None:
    """Compress a model by a recipe; measure every step; save a loadable artifact."""
    from jobs.optimize import OptimizeSpec, prepare_optimize, run_optimize
    from optimize.report import FIDELITY

    plan = prepare_optimize(OptimizeSpec(eval=eval_, **flags))
    results = run_optimize(plan, ctx.obj["address"])
    metric = FIDELITY[plan.task]
    base = results[0]["metrics"]["rows_per_s"]
    for r in results:
        m = r["metrics"]
        click.echo(
            f"{r['name']:<16} {metric} {m[metric]:.4f}  "
            f"{m['bytes'] / 1e6:8.1f} MB  {m['rows_per_s']:8.1f} rows/s "
            f"({m['rows_per_s'] / base:.2f}x)"
        )
    click.echo(f"artifact: {plan.spec.output} (report.md, tradeoff.png)")


def main() -> None:
    cli(prog_name="lmbatch")


if __name__ == "__main__":
    sys.exit(main())
