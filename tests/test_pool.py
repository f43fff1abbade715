"""Pool sizing from cluster resources: never reserve the CPU the readers need."""

from __future__ import annotations

import pytest

from actors.errors import UserError
from jobs.pool import plan_pool


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


def test_one_actor_per_gpu():
    plan = plan_pool({"CPU": 8.0, "GPU": 2.0}, None)
    assert (plan.max_actors, plan.num_gpus) == (2, 1.0)
    with pytest.raises(UserError, match="2 GPUs"):
        plan_pool({"CPU": 8.0, "GPU": 2.0}, (1, 3))
