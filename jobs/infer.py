"""The offline inference driver.

    files --read_datasource--> id, _text, _error             (jobs/sources.py)
          --map_batches(tokenize_batch), CPU tasks--> id, _ids, _error
          --map_batches(PredictActor), actor pool--> id, <task columns>, error
          --write_parquet--> OUTPUT/*.parquet + OUTPUT/_summary.json

Usage: ``run_infer(prepare_infer(spec))``; the CLI does both (``lmbatch infer``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import ray
import ray.data

from lmbatch.actors.model_info import CHUNK_TASKS, ModelInfo, ModelSpec
from lmbatch.jobs.cluster import gpu_view
from lmbatch.jobs.encodings import UTF8
from lmbatch.jobs.gpus import choose_device, per_gpu, planned_precision, pool_gpus
from lmbatch.jobs.lease import writer_lease
from lmbatch.jobs.output import holds_output
from lmbatch.jobs.pool import PoolPlan, plan_pool
from lmbatch.jobs.progress import Pool, footer_rows, progress, quiet_ray_data
from lmbatch.jobs.resume import (
    begin_output,
    checkpoint_config,
    nothing_left,
    same_model,
)
from lmbatch.jobs.session import ray_session, this_node
from lmbatch.jobs.sources import Columns, read_rows
from lmbatch.jobs.spec import InferPlan, InferSpec, ModelFlags
from lmbatch.jobs.stages import stage_times
from lmbatch.jobs.summary import (
    Summary,
    build_summary,
    expected_rows,
    start_sink,
    write_summary,
)

if TYPE_CHECKING:  # imported where a job builds it, as the actor classes are
    from lmbatch.actors.predict import PredictorConfig

log = logging.getLogger("lmbatch")
MAX_TASK_RETRIES = 3
TOKENIZE_CPUS = 1.0


def run_infer(plan: InferPlan, address: str | None = None) -> Summary:
    """Run a validated job to the end; return its summary (also written to OUTPUT)."""
    begun = time.time()
    with contextlib.ExitStack() as lease, ray_session(address):
        up = time.time()
        tokenize = tokenize_config(plan)  # a task builds it while the pool is planned
        pool, sized = size_pool(plan)  # may refuse the job: delete nothing before it
        if plan.spec.overwrite:
            replace_output(plan, tokenize)
        restored = begin_output(plan, pool.device)
        lease.enter_context(writer_lease(plan.output_fs, plan.output_path))
        total = plan_total(plan)
        if nothing_left(plan, restored, total()):
            summary = done_summary(plan, restored, (begun, up))
        else:
            times = (begun, up)
            summary = run_rows(plan, pool, sized, tokenize, restored, total, times)
        summary.input_rows, summary.limit = total(), plan.spec.limit
        summary.max_length = plan.max_length
        summary.can_chunk = plan.spec.task in CHUNK_TASKS
        write_summary(plan.output_fs, plan.output_path, summary)
    return summary


def run_rows(
    plan: InferPlan,
    pool: PoolPlan,
    sized: str,
    tokenize: ray.ObjectRef,
    restored: int,
    total: Callable[[], int | None],
    times: tuple[float, float],
) -> Summary:
    """Stream the rows not yet written through the pool into the output; ``times``:
    (run_infer began, Ray was up)."""
    sink = start_sink()
    started = time.time()
    with (
        data_context(checkpoint_config(plan)),
        quiet_ray_data(plan.spec.verbose),
        progress(
            sink,
            Pool(pool.min_actors, pool.gpus),
            lambda: expected_rows(total(), restored, plan.spec.limit),
            restored,
        ),
    ):
        ds = build_dataset(plan, pool, tokenize, sink)
        ds.write_parquet(
            plan.output_path,
            filesystem=plan.output_fs,
            min_rows_per_file=plan.spec.rows_per_file,
        )
    return summarise(plan, ds, sink, (*times, started), restored, sized)


def done_summary(plan: InferPlan, restored: int, times: tuple[float, float]) -> Summary:
    """The summary of a --resume that found every input row written: counted from
    the output as a run's is, with no pool started and nothing computed."""
    begun, up = times
    own = set(plan.columns) - set(plan.keep)
    pool = f"not started: the output holds all {restored:,} input rows"
    summary = build_summary(
        plan.output_fs, plan.output_path, 0.0, [], restored, pool, own
    )
    summary.startup_seconds = round(time.time() - begun, 3)
    summary.ray_seconds = round(up - begun, 3)
    return summary


def dry_run(plan: InferPlan, address: str | None = None) -> list[str]:
    """What the job would do, from the checks and the pool sizing a run makes, with
    nothing written: no ``_job.json``, no lease, nothing deleted, no row read. The
    tokenizer loads as a run loads it (a task, a few seconds): what only it can
    tell, a model without one or a --max-length with no room for a text, is found."""
    spec = plan.spec
    held = holds_output(plan.output_fs, plan.output_path)
    state = "--overwrite replaces the earlier job's output" if held else "new"
    total = plan_total(plan)()
    with ray_session(address):
        tokenize = tokenize_config(plan)
        pool, sized = size_pool(plan)
        ray.get(tokenize)
        if spec.resume and held:
            kept = begin_output(plan, pool.device)  # checks; writes nothing here
            state = f"--resume keeps its {kept} finished rows"
            if nothing_left(plan, kept, total):
                state += ", all the input's: the pool would not start"
    rows = "rows not known before reading" if total is None else f"{total} rows"
    limit = "" if spec.limit is None else f"; --limit {spec.limit} new rows at most"
    arch = ", ".join(plan.model.architectures) or "unknown architecture"
    precision = planned_precision(plan.model, spec.precision, pool.device)
    files = f"{len(plan.inputs.paths)} {plan.inputs.format} files"
    if plan.inputs.encoding != UTF8:
        files += f" in {plan.inputs.encoding}"
    return [
        "dry run: nothing was run or written",
        f"model {spec.model} ({arch}): {spec.task}, {precision} on {pool.device}",
        f"inputs {files}, {rows}{limit}",
        f"output {spec.output}: {state}",
        f"columns {', '.join(plan.columns)}",
        f"pool {sized}",
        *([f"prompt {plan.prompt!r}"] if plan.prompt else []),
        *(
            [f"text pairs: {spec.text_column!r} with {spec.pair_column!r}"]
            if spec.pair_column
            else []
        ),
        *([chat_line(spec)] if spec.chat_template else []),
        *([spec.sampling().describe()] if spec.temperature else []),
        *(
            [f"embeddings {spec.embedding_precision}: a bit a dimension"]
            if spec.embedding_precision != "float32"
            else []
        ),
        *([f"stops at {', '.join(map(repr, spec.stop))}"] if spec.stop else []),
        *(
            [
                f"long texts read whole in windows of {plan.max_length} tokens"
                + (
                    f", each repeating {spec.chunk_overlap} of the one before"
                    if spec.chunk_overlap
                    else ""
                )
            ]
            if spec.on_long == "chunk"
            else []
        ),
    ]


def chat_line(spec: InferSpec) -> str:
    """How a chat job renders its texts, for the dry run."""
    answer = f", {spec.pair_column!r} the answer scored" if spec.task == "score" else ""
    system = "" if spec.system_prompt is None else f" after {spec.system_prompt!r}"
    return f"chat template: {spec.text_column!r} the user's message{system}{answer}"


def summarise(
    plan: InferPlan,
    ds: ray.data.Dataset,
    sink: ray.actor.ActorHandle,
    times: tuple[float, float, float],
    restored: int,
    sized: str,
) -> Summary:
    """The summary of a finished job; ``times``: (run_infer began, Ray was up, the
    job started), wall clock, as the stats sink on this node stamps the first batch."""
    begun, up, started = times
    seconds = time.time() - started
    actors, first = ray.get([sink.snapshot.remote(), sink.first_batch.remote()])
    ray.kill(sink)  # named actors outlive their handles
    for a in actors:  # stamped on the sink's node, the driver's: one clock
        a["ready_seconds"] = round(a.pop("ready_at") - started, 3)
    own = set(plan.columns) - set(plan.keep)
    summary = build_summary(
        plan.output_fs, plan.output_path, seconds, actors, restored, sized, own
    )
    one_node = sum(1 for n in ray.nodes() if n["Alive"]) == 1
    summary.stages = stage_times(ds, started, one_node)
    summary.startup_seconds = round(started - begun, 3)
    summary.ray_seconds = round(up - begun, 3)
    if first is not None:
        summary.first_batch_seconds = round(first - started, 3)
    return summary


def replace_output(plan: InferPlan, tokenize: ray.ObjectRef) -> None:
    """Empty the output ``--overwrite`` replaces, once the tokenizer has loaded: a
    --model that cannot tokenize fails the job with the old output still there. The
    wait (the task's second or two) is skipped where there is nothing to delete, or
    where the same model wrote it: re-running a job does not pay it."""
    fs, path = plan.output_fs, plan.output_path
    if holds_output(fs, path):
        if not same_model(plan):
            ray.get(tokenize)
        fs.delete_dir_contents(path)


def plan_total(plan: InferPlan) -> Callable[[], int | None]:
    """Counts the job's input rows, where the files' metadata gives them; once, for
    the progress line and the summary's check of rows out against rows in."""
    inputs = plan.inputs
    return functools.cache(
        lambda: footer_rows(inputs.filesystem, inputs.paths, inputs.format)
    )


@contextlib.contextmanager
def data_context(checkpoint) -> Iterator[None]:
    """Ray Data's settings for this job's dataset only: checkpointing on; a batch
    retried when its actor's node vanished mid-call (Ray reports the actor
    unavailable, "may or may not have run": the output is written once either way);
    and a task's own exception raised as it is, not inside Ray Data's
    UserCodeException, whose cause does not cross the process: a UserError from a
    tokenize task stays one line."""
    context = ray.data.DataContext.get_current()
    fields = (
        "checkpoint_config",
        "actor_task_retry_on_errors",
        "raise_original_map_exception",
    )
    before = {name: getattr(context, name) for name in fields}
    context.checkpoint_config = checkpoint
    context.actor_task_retry_on_errors = [ray.exceptions.ActorUnavailableError]
    context.raise_original_map_exception = True
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(context, name, value)


def model_spec(spec: ModelFlags) -> ModelSpec:
    return ModelSpec(
        spec.model,
        spec.task,
        spec.precision,
        spec.trust_remote_code,
        spec.allow_pickle,
        spec.int8_threshold,
    )


def size_pool(plan: InferPlan) -> tuple[PoolPlan, str]:
    """The pool for this cluster, and a line saying how it was sized; on GPUs,
    packed by the model's footprint, over the GPUs asked for (some of which the
    autoscaler may still have to start)."""
    spec = plan.spec
    view = gpu_view()
    gpu_flags = {"--gpus": spec.gpus, "--actors-per-gpu": spec.actors_per_gpu}
    device = choose_device(spec.device, spec.precision, plan.model, view, gpu_flags)
    gpus, packed = 0, 1
    if device == "cuda":
        gpus = pool_gpus(spec.gpus, view)
        packed = per_gpu(
            plan.model_dir, plan.model, spec.precision, spec.actors_per_gpu, view
        )
    resources = ray.cluster_resources()
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]
    # A resumed job's read passes Ray Data's checkpoint filter, an actor of 1 CPU.
    pool = plan_pool(
        resources,
        spec.actors,
        packed,
        spec.actor_memory,
        [n for n in nodes if n],
        ray_cpus=1.0 if spec.resume else 0.0,
        device=device,
        gpus=gpus,
        cpus_per_gpu=view.cpus_per_gpu,
    )
    why = f" (cluster: {view.describe()})" if device == "cuda" else ""
    return pool, pool.describe() + why


def tokenize_settings(
    spec: ModelFlags, info: ModelInfo, max_length: int, prompt: str = ""
):
    """The tokenize stage's config, before its tokenizer's definition is added."""
    from lmbatch.actors.tokenize import TokenizeConfig

    return TokenizeConfig(
        model_path=spec.model,
        max_length=max_length,
        prefix=prompt,
        chat=spec.chat_template,
        system=spec.system_prompt,
        on_long=spec.on_long,
        overlap=spec.chunk_overlap,
        min_tokens=2 if spec.task == "score" else 1,  # one to condition, one to score
        trust_remote_code=spec.trust_remote_code,
        lowercase=info.sentence.lowercase,
        continuation=spec.task == "score",
        pairs=getattr(spec, "pair_column", None) is not None and spec.task != "score",
        # A prompt too long keeps its end, which the new tokens continue (and a chat
        # template's turn for the answer); vLLM's truncate_prompt_tokens keeps it too.
        truncation_side="left" if spec.task == "generate" else None,
    )


def tokenize_config(plan: InferPlan) -> ray.ObjectRef:
    """A reference to the tokenize tasks' config, which a task on this node completes
    with the tokenizer's definition (``with_backend``) while the job starts: loading
    the tokenizer imports transformers and torch, seconds the driver does not wait."""
    from lmbatch.actors.tokenize import with_backend

    config = tokenize_settings(plan.spec, plan.model, plan.max_length, plan.prompt)
    # No CPU reserved: a one-off that must not wait behind the job's own tasks.
    task = ray.remote(with_backend).options(num_cpus=0, scheduling_strategy=this_node())
    return task.remote(config)


def predictor_config(
    plan: InferPlan, device: str, threads: int, actors_per_node: int, sink=None
) -> PredictorConfig:
    """What each actor of the job is built from (``PredictorConfig``)."""
    from lmbatch.actors.predict import PredictorConfig

    spec = plan.spec
    return PredictorConfig(
        model=model_spec(spec),
        info=plan.model,
        device=device,
        threads=threads,
        batch_tokens=spec.batch_tokens,
        max_new_tokens=spec.max_new_tokens,
        max_length=plan.max_length,
        prompt=plan.prompt,
        encoding=spec.encoding(),
        chunk=spec.on_long == "chunk",
        sampling=spec.sampling(),
        stop=spec.stop,
        memory_limit=spec.actor_memory,
        actors_per_node=actors_per_node,
        share_flag="--actors",
        stats=sink,
    )


def build_dataset(
    plan: InferPlan, pool: PoolPlan, tokenize: ray.ObjectRef, sink=None
) -> ray.data.Dataset:
    """The lazy pipeline read -> tokenize -> predict; nothing runs until consumed.
    ``tokenize``: ``tokenize_config(plan)``."""
    from lmbatch.actors.predict import PredictActor
    from lmbatch.actors.tokenize import tokenize_batch

    spec = plan.spec
    nodes = max(1, sum(1 for n in ray.nodes() if n["Alive"]))
    predictor = predictor_config(
        plan, pool.device, pool.threads, -(-pool.max_actors // nodes), sink
    )
    columns = Columns(spec.text_column, spec.id_column, plan.keep, spec.pair_column)
    ds = read_rows(plan.inputs, columns)
    if spec.limit is not None:  # after Ray Data's checkpoint filter: new rows only
        ds = ds.limit(spec.limit)
    rows = spec.batch_rows or pool.rows_per_call
    # Tokenizing is a CPU stage of its own tasks, never fused into the actors (their
    # resources differ), so every free core can feed them.
    ds = ds.map_batches(
        tokenize_batch,
        fn_kwargs={"config": tokenize},
        batch_size=rows,
        batch_format="pyarrow",
        num_cpus=TOKENIZE_CPUS,
    )
    # Ray 2.60 has no named parameter for the retry limits and warns about every
    # keyword it passes on to the actors; pyproject keeps ray below 2.64, where that
    # pass-through is removed.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(
            PredictActor,
            fn_constructor_kwargs={"config": predictor},
            batch_size=rows,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(
                min_size=pool.min_actors, max_size=pool.max_actors
            ),
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus or None,
            memory=pool.memory,
            # A killed or preempted actor always comes back; a batch that kills its
            # actor MAX_TASK_RETRIES times fails the job (then --resume) instead of
            # looping.
            max_restarts=-1,
            max_task_retries=MAX_TASK_RETRIES,
        )
