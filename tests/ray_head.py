"""A real Ray head started with ``ray start --head --block`` on 127.0.0.1, free ports.

Token authentication is on, as Ray 2.60 defaults it: ``ray start --head`` turns it on
wherever a token exists, so the head's token is made first with
``ray get-auth-token --generate``. The head runs with its own HOME: its
``~/.ray/auth_token`` is written there and nothing of the user's is read.
Stopped by its process id: ``--block`` makes ``ray start`` own every process it
started and take them down when it gets SIGTERM. A head with an autoscaler
(``autoscaling=``, Ray's fake multi-node provider: its worker nodes are more Ray
processes on this machine, started by the head's monitor) runs in a process group of
its own and is stopped by that group's id, workers included; ``ray stop`` would stop
every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RAY = Path(sys.executable).with_name("ray")
LMBATCH = Path(sys.executable).with_name("lmbatch")
RAY_MAIN = "import sys; from ray.scripts.scripts import main; sys.exit(main())"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    process: subprocess.Popen
    address: str  # the Jobs API: http://127.0.0.1:PORT
    token_path: Path
    home: Path
    temp_dir: str  # Ray's session files

    def client_env(self, token: bool = True) -> dict[str, str]:
        """An environment for ``lmbatch`` as a user's shell: the token file, or none."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env["HOME"] = str(self.home.parent / ("client" if token else "no-token"))
        Path(env["HOME"]).mkdir(exist_ok=True)
        if token:
            env["RAY_AUTH_TOKEN_PATH"] = str(self.token_path)
        return env

    def stop(self) -> None:
        """Everything the head started (its process group), SIGTERM then SIGKILL:
        Ray's graceful stop took 30 s here and left its agents running for two
        minutes more, and a test head holds nothing worth the wait."""
        os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):  # none of the group is left
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(
    root: Path,
    num_cpus: int = 2,
    timeout_s: float = 120,
    python: Path | None = None,
    autoscaling: dict[str, dict] | None = None,
) -> RayHead:
    """A head on free ports.

    Args:
        python: the interpreter it and its jobs run with (default this one, with
            lmbatch installed).
        autoscaling: worker node types (name -> resources, min_workers, max_workers)
            that the head's autoscaler may start, as fake nodes on this machine.
    """
    ray = [str(RAY)] if python is None else [str(python), "-c", RAY_MAIN]
    home = root / "head-home"
    home.mkdir(parents=True)
    temp = tempfile.mkdtemp(prefix="lmbh", dir="/tmp")  # short: Ray's unix sockets
    dashboard = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--ray-client-server-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(home)
    subprocess.run(
        [*ray, "get-auth-token", "--generate"],
        env=env,
        check=True,
        capture_output=True,
    )
    # The job's entrypoint runs `python`: the head's own interpreter.
    bin_dir = (python or RAY).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    cmd = [
        *ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
        "--dashboard-host", "127.0.0.1", f"--num-cpus={num_cpus}", "--num-gpus=0",
        f"--temp-dir={temp}", "--include-dashboard=true",
        *[f"{flag}={port}" for flag, port in ports.items()],
    ]  # fmt: skip
    if autoscaling is not None:
        config = root / "autoscaling.json"
        config.write_text(
            json.dumps(fake_cluster(ports["--port"], num_cpus, autoscaling))
        )
        cmd.append(f"--autoscaling-config={config}")
        env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    log = open(root / "head.log", "w")  # noqa: SIM115 - the head outlives this call
    process = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    head = RayHead(
        process,
        f"http://127.0.0.1:{dashboard}",
        home / ".ray" / "auth_token",
        home,
        temp,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start failed: {(root / 'head.log').read_text()}")
        if head.token_path.exists() and _answers(head):
            return head
        time.sleep(1)
    head.stop()
    raise RuntimeError(
        f"no Ray head after {timeout_s}s: {(root / 'head.log').read_text()}"
    )


def fake_cluster(port: int, head_cpus: int, workers: dict[str, dict]) -> dict:
    """An autoscaling config for Ray's fake multi-node provider."""
    head = {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}
    types = {"ray.head.default": head}
    for name, worker in workers.items():
        types[name] = {"node_config": {}, "min_workers": 0, **worker}
    return {
        "cluster_name": "lmbatch-test",
        "max_workers": sum(t.get("max_workers", 0) for t in workers.values()),
        "provider": {
            "type": "fake_multinode",
            "gcs_address": f"127.0.0.1:{port}",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "docker": {},
        **{
            key: []
            for key in (
                "initialization_commands",
                "setup_commands",
                "head_setup_commands",
                "worker_setup_commands",
                "head_start_ray_commands",
                "worker_start_ray_commands",
                "cluster_synced_files",
                "rsync_exclude",
                "rsync_filter",
            )
        },  # fmt: skip
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }


def _answers(head: RayHead) -> bool:
    import urllib.request

    request = urllib.request.Request(
        head.address + "/api/version",
        headers={"Authorization": f"Bearer {head.token_path.read_text().strip()}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
