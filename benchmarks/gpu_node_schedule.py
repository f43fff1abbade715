"""How Ray Data schedules an infer job's stages on a GPU node, emulated on any machine.

Ray Data's resource allocator decides from logical resources how many tasks of each
stage run at once. A local Ray started with a GPU node's logical CPUs and GPUs (here
16 and 1, an H200 node) makes the same decisions on a CPU-only machine; the actors,
finding no CUDA, run MiniLM without its layers on CPU. Wall times are this machine's
and mean nothing; the most tokenize tasks that ran at once, read off Ray's task
timeline, is the allocator's decision. Run once with the GPU actors reserving a whole
CPU each, once with the pool's own plan (``jobs/pool.py``).

Usage: python benchmarks/gpu_node_schedule.py [--rows 200000] [--cpus 16] [--gpus 1]
           [--actors-per-gpu 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import ray

from common import append_results, corpus_rows, null_minilm  # isort: skip

STAGES = {"tokenize": "MapBatches(tokenize_batch)", "write": "Write"}


def most_at_once(events: list[dict], category: str) -> tuple[int, int]:
    """(tasks, most running at once) of one kind in Ray's timeline."""
    spans = [e for e in events if e.get("ph") == "X" and e.get("cat") == category]
    spans = [s for s in spans if s["name"].endswith("_map_task")]
    starts = [(s["ts"], 1) for s in spans]
    edges = sorted(starts + [(s["ts"] + s["dur"], -1) for s in spans])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return len(spans), most


def run(args, model: str, data: Path, out: Path, actor_cpus: float | None) -> dict:
    """One job on a fresh local Ray shaped like the GPU node."""
    from lmbatch.jobs.infer import build_dataset, size_pool, tokenize_config
    from lmbatch.jobs.spec import InferSpec, prepare_infer

    spec = InferSpec(
        model=model, task="embed", inputs=(str(data),), output=str(out),
        overwrite=True, device="cuda", actors_per_gpu=args.actors_per_gpu,
    )  # fmt: skip
    plan = prepare_infer(spec)
    ray.init(address="local", num_cpus=args.cpus, num_gpus=args.gpus,
             include_dashboard=False)  # fmt: skip
    try:
        pool, _ = size_pool(plan)
        if actor_cpus is not None:
            pool = dataclasses.replace(pool, num_cpus=actor_cpus)
        dataset = build_dataset(plan, pool, tokenize_config(plan))
        dataset.write_parquet(str(out), min_rows_per_file=50_000)
        events = ray.timeline()
    finally:
        ray.shutdown()
    found = {name: most_at_once(events, f"task::{op}") for name, op in STAGES.items()}
    return {"actor_cpus": pool.num_cpus, "actors": pool.max_actors, **found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--cpus", type=int, default=16)
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--actors-per-gpu", type=int, default=8)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lmbatch-schedule-"))
    data = tmp / "rows.parquet"
    corpus_rows(args.rows, data)
    model = null_minilm(tmp, tmp)
    lines = [
        f"{args.rows:,} rows, {args.cpus} logical CPUs, {args.gpus} logical GPU(s), "
        f"{args.actors_per_gpu} actors a GPU; MiniLM without its layers", "",
        "| GPU actor CPUs each | actors | tokenize tasks | most at once "
        "| write tasks | most at once |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for cpus in (1.0, None):  # a whole CPU each, then the pool's own plan
        r = run(args, model, data, tmp / "out", cpus)
        (tasks, most), (writes, most_w) = r["tokenize"], r["write"]
        lines.append(f"| {r['actor_cpus']:g} | {r['actors']} | {tasks} | {most} "
                     f"| {writes} | {most_w} |")  # fmt: skip
    append_results("gpu_node_schedule: a GPU node's stages, emulated", lines)


if __name__ == "__main__":
    main()
