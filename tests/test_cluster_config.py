"""cluster.yaml is a config `ray up` accepts, by Ray's own schema validation."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_ray_accepts_cluster_yaml():
    validate_config(prepare_config(load()))


def test_a_cpu_head_and_two_gpu_worker_types_of_different_memory():
    config = load()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"]
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU")}
    memories = {n for t in gpu_types.values() for n in t["resources"] if "gpu_" in n}
    assert len(gpu_types) >= 2 and len(memories) >= 2
    for t in gpu_types.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"]


def test_every_node_installs_this_project_and_starts_with_token_auth():
    config = load()
    assert config["file_mounts"]["~/lmbatch"] == "."
    assert any("pip install -e" in c for c in config["setup_commands"])
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


def test_the_validation_is_real_a_misspelt_field_is_refused():
    config = load()
    config["available_node_types"]["gpu.24gb"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(config))
