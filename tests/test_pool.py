"""Pool sizing from cluster resources: never reserve the CPU the readers need."""

from __future__ import annotations

import pytest

from lmbatch.errors import UserError
from lmbatch.jobs.pool import actors_per_gpu, plan_pool


def test_two_cores_one_actor_two_threads_one_cpu_left():
    plan = plan_pool({"CPU": 2.0}, None)
    assert (plan.min_actors, plan.max_actors, plan.threads) == (1, 1, 2)
    assert plan.num_cpus * plan.max_actors <= 1.0 and plan.num_gpus == 0


def test_sixteen_cores_four_actors_of_four_threads():
    plan = plan_pool({"CPU": 16.0}, None)
    assert (plan.max_actors, plan.threads) == (4, 4)
    assert plan.num_cpus * plan.max_actors <= 15.0


def test_asked_actors_share_what_is_left():
    plan = plan_pool({"CPU": 2.0}, (1, 2))
    assert (plan.min_actors, plan.max_actors, plan.threads) == (1, 2, 1)
    assert plan.num_cpus * 2 <= 1.0


def test_too_many_actors_refused():
    with pytest.raises(UserError, match="--actors"):
        plan_pool({"CPU": 2.0}, (1, 8))


def test_one_actor_per_gpu_and_the_whole_pool_starts():
    plan = plan_pool({"CPU": 8.0, "GPU": 2.0}, None, device="cuda", gpus=2)
    assert (plan.min_actors, plan.max_actors, plan.num_gpus) == (2, 2, 1.0)
    assert plan.rows_per_call == 8192 and plan.device == "cuda"
    with pytest.raises(UserError, match="at 1 per GPU"):
        plan_pool({"CPU": 8.0, "GPU": 2.0}, (1, 3), device="cuda", gpus=2)


def test_gpu_actors_fit_the_cpus_of_the_gpu_nodes():
    # GPU nodes with 1 CPU per GPU, 4 actors on each GPU: a quarter CPU each.
    plan = plan_pool(
        {"CPU": 8.0}, None, per_gpu=4, device="cuda", gpus=2, cpus_per_gpu=1.0
    )
    assert plan.max_actors == 8 and plan.num_cpus == 0.25


def test_the_actors_of_a_gpu_share_one_cpu_and_leave_the_rest_to_tokenizing():
    # An H200 node: 16 CPUs, one GPU, 8 actors on it.
    plan = plan_pool(
        {"CPU": 16.0, "GPU": 1.0}, None, per_gpu=8, device="cuda", gpus=1,
        cpus_per_gpu=16.0,
    )  # fmt: skip
    assert plan.max_actors == 8 and plan.num_cpus == 0.125
    three = plan_pool({"CPU": 16.0}, None, per_gpu=3, device="cuda", gpus=1)
    assert three.num_cpus == 0.3333  # rounded down to Ray's 1e-4


def test_gpus_unused_unless_the_pool_is_a_gpu_pool():
    plan = plan_pool({"CPU": 8.0, "GPU": 2.0}, None)
    assert plan.num_gpus == 0 and plan.rows_per_call == 1024


def test_int8_packs_about_twice_the_actors_of_fp16():
    gib = 1 << 30
    fp16 = actors_per_gpu(14 * gib, 40 * gib)  # a 7B model: 14 GiB + 14 GiB reserve
    int8 = actors_per_gpu(7 * gib, 40 * gib)
    nf4 = actors_per_gpu(int(3.5 * gib), 40 * gib)
    assert (fp16, int8, nf4) == (1, 2, 2)  # nf4: 5 fit, capped at MAX_ACTORS_PER_GPU
    assert actors_per_gpu(7 * gib, 80 * gib, asked=5) == 5  # all that fit, if asked
    plan = plan_pool({"CPU": 16.0, "GPU": 2.0}, None, per_gpu=5, device="cuda", gpus=2)
    assert plan.min_actors == plan.max_actors == 10
    assert plan.num_gpus == pytest.approx(0.2)


def test_small_models_keep_a_batch_reserve():
    assert actors_per_gpu(90 << 20, 24 << 30) == 2  # capped, not 240 tiny actors
    assert actors_per_gpu(90 << 20, 2 << 30) == 1  # 1 GiB reserve at the least


def test_asked_actors_per_gpu_must_fit():
    gib = 1 << 30
    assert actors_per_gpu(14 * gib, 80 * gib, asked=2) == 2
    with pytest.raises(UserError, match="--actors-per-gpu"):
        actors_per_gpu(14 * gib, 80 * gib, asked=3)
    with pytest.raises(UserError, match="int8 or nf4"):
        actors_per_gpu(40 * gib, 24 * gib)


def test_actor_memory_bounds_the_cpu_pool():
    plan = plan_pool({"CPU": 16.0, "memory": 6e9}, None, actor_memory=2_000_000_000)
    assert plan.max_actors == 3 and plan.memory == 2_000_000_000
    with pytest.raises(UserError, match="--actor-memory"):
        plan_pool({"CPU": 2.0, "memory": 1e9}, (1, 1), actor_memory=2_000_000_000)


def test_a_resumed_job_leaves_a_cpu_to_the_checkpoint_filter():
    plan = plan_pool({"CPU": 2.0}, None, ray_cpus=1.0)
    assert plan.max_actors == 1 and plan.threads == 2
    assert plan.num_cpus + 1.0 + 1.0 <= 2.0  # the filter actor and a read task fit


def test_nodes_each_get_actors_and_one_keeps_a_cpu_for_reads():
    plan = plan_pool({"CPU": 6.0}, None, node_cpus=[2.0, 2.0, 2.0])
    assert (plan.max_actors, plan.threads) == (3, 2)
    assert 2.0 - plan.num_cpus >= 1.0
    # Actors go where the CPUs are: five on the 16-CPU node, none on the 2-CPU one.
    mixed = plan_pool({"CPU": 18.0}, None, node_cpus=[16.0, 2.0])
    assert (mixed.max_actors, mixed.threads) == (5, 3)
    assert 16.0 - 5 * mixed.num_cpus >= 1.0


@pytest.mark.parametrize(
    "device, precision, gpus, why",
    [
        ("auto", "auto", 0, "the cluster has no GPU, and no node type"),
        ("cpu", "auto", 2, "--device cpu"),
        ("auto", "cpu-int8", 2, "--precision cpu-int8 runs on CPU kernels"),
    ],
)
def test_a_gpu_flag_for_a_pool_that_runs_on_cpu_is_refused(
    tiny_models, device, precision, gpus, why
):
    """--gpus or --actors-per-gpu asks for GPUs: a pool on CPU would ignore it."""
    from lmbatch.actors.model_info import inspect_model
    from lmbatch.jobs.cluster import GpuView
    from lmbatch.jobs.gpus import choose_device

    info = inspect_model(tiny_models["bert"], "embed")
    view = GpuView(now=gpus, most=gpus, memory_bytes=None, smallest="", cpus_per_gpu=8)
    for flag in ("--gpus", "--actors-per-gpu"):
        with pytest.raises(UserError) as refused:
            choose_device(device, precision, info, view, {flag: 2})
        assert str(refused.value).startswith(
            f"{flag}: applies to a pool of GPUs; this one runs on CPU: {why}"
        )
    assert choose_device(device, precision, info, view, {"--gpus": None}) == "cpu"
