"""Cluster submission through the Ray Jobs API.

    lmbatch infer ... --address http://HEAD:8265
        --JobSubmissionClient.submit_job--> on the cluster:
        python -m lmbatch.jobs.run infer '<spec as JSON>'
        with the installed lmbatch package shipped in the runtime_env's py_modules

The spec that runs on the cluster is the one built here from the flags, so a submitted
job and a local one cannot drift apart. Ray 2.60 heads require a token by default; it is
found where Ray itself looks (``RAY_AUTH_TOKEN``, the file at ``RAY_AUTH_TOKEN_PATH``,
``~/.ray/auth_token``) and sent as a bearer header whatever ``RAY_AUTH_MODE`` says here.
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import os
import shlex
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lmbatch.actors.storage import absolute, is_uri
from lmbatch.errors import UserError
from lmbatch.jobs.options import Spec

NODE_LIST_TRIES = 20
# The parts of the lmbatch package (pyproject.toml's packages), shipped with each job.
PARTS = ("jobs", "actors", "optimize", "errors")
TOKEN_HELP = (
    "set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a copy of the head's "
    "~/.ray/auth_token (`ray get-auth-token` on the head prints it)"
)


@dataclass(frozen=True)
class SubmitOptions:
    """How a job goes to a cluster, from the launcher's flags."""

    address: str  # http(s)://HEAD:8265, the Ray dashboard
    insecure: bool = False  # allow a non-loopback address without a token
    wait: bool = True  # follow the logs and exit with the job's status
    pip: tuple[str, ...] = ()  # extra requirements installed for this job
    shared_paths: bool = False  # local paths are on storage every node mounts


def is_jobs_address(address: str | None) -> bool:
    """An http(s) address is a Jobs API server; anything else is for ``ray.init``."""
    return bool(address) and address.startswith(("http://", "https://"))


def is_loopback(address: str) -> bool:
    """Whether an http(s) address is this machine."""
    return is_loopback_host(urlparse(address).hostname or "")


def is_loopback_host(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def find_token() -> tuple[str | None, str]:
    """(token, where it came from), looking where Ray looks, in Ray's order."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    where = "RAY_AUTH_TOKEN_PATH" if path else "~/.ray/auth_token"
    path = Path(path).expanduser() if path else Path.home() / ".ray" / "auth_token"
    token = path.read_text().strip() if path.is_file() else ""
    return (token, f"{where} ({path})") if token else (None, "nowhere")


def connect(address: str | None, insecure: bool = False):
    """A Jobs client for ``address``, authenticated; every failure is one clear line.

    Raises:
        UserError: naming ``--address`` when the address, token or server is wrong.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if not address:
        raise UserError(
            "--address",
            "required: the cluster's dashboard, http://HOST:8265 (or RAY_ADDRESS)",
        )
    if not is_jobs_address(address):
        raise UserError(
            "--address",
            f"expected the cluster's dashboard as http://HOST:8265, got {address!r} "
            "(also read from RAY_ADDRESS)",
        )
    token, where = find_token()
    if token is None and not is_loopback(address) and not insecure:
        raise UserError(
            "--address",
            f"no Ray auth token found for {address}: {TOKEN_HELP}; "
            "--insecure submits without one to a cluster with auth turned off",
        )
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        if token is None:
            raise UserError(
                "--address", f"{address} requires a Ray auth token: {TOKEN_HELP}"
            ) from None
        raise UserError(
            "--address",
            f"{address} refused the token from {where}: it is not this cluster's",
        ) from None
    except RuntimeError as e:  # the version check: something else answers there
        raise UserError(
            "--address", f"{address} does not answer as a Ray dashboard: {e}"
        ) from None
    except ConnectionError:
        raise UserError(
            "--address",
            f"no Ray dashboard answers at {address}: is the cluster up and the "
            "port its dashboard's (8265 by default)?",
        ) from None


def submit(kind: str, spec: Spec, options: SubmitOptions, echo: Callable) -> int:
    """Submit ``spec`` to run as ``kind`` on the cluster; return the exit status.

    Without ``wait`` that is 0 once the job is accepted; with it, the job's own: 0 when
    it SUCCEEDED, 1 otherwise, after its logs were printed as they came.
    """
    shared = options.shared_paths
    if not is_loopback(options.address):  # refused before anything is sent
        spec = cluster_paths(spec, here=False, shared=shared)
    client = connect(options.address, options.insecure)
    # A loopback address may still be a tunnel to a remote cluster (`ray dashboard`).
    spec = cluster_paths(spec, here=runs_here(client), shared=shared)
    # The flags as given, not every default: the job checks which were given (a
    # flag of another task) as the command line's own run does.
    given = spec.model_dump_json(exclude_unset=True)
    entrypoint = f"python -m lmbatch.jobs.run {kind} {shlex.quote(given)}"
    with tempfile.TemporaryDirectory(prefix="lmbatch-ship-") as tmp:
        runtime_env: dict[str, Any] = {"py_modules": [str(ship_package(Path(tmp)))]}
        if options.pip:
            runtime_env["pip"] = list(options.pip)
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            metadata={"lmbatch": kind, "submitted_from": socket.gethostname()},
        )
    echo(f"submitted {kind} job {job_id} to {options.address}")
    if not options.wait:
        echo(f"follow it with: lmbatch jobs logs {job_id} --follow")
        return 0
    return follow_logs(client, job_id, echo)


def ship_package(into: Path) -> Path:
    """The installed lmbatch as one package directory for the cluster: each part
    copied from wherever it is installed (a wheel's site-packages, or an editable
    checkout's project folders), with an ``__init__.py`` so that it, and not another
    lmbatch on the cluster, is what the job imports."""
    package = into / "lmbatch"
    package.mkdir()
    (package / "__init__.py").write_text('"""lmbatch, as shipped with a job."""\n')
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in PARTS:
        found = importlib.util.find_spec(f"lmbatch.{part}")
        source = Path(found.submodule_search_locations[0])
        shutil.copytree(source, package / part, ignore=skip)
    return package


def follow_logs(client, job_id: str, echo: Callable) -> int:
    """Print the job's logs until it ends; 0 if it SUCCEEDED, else 1."""
    from ray.job_submission import JobStatus

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            echo(chunk, nl=False)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        echo(f"\nstopped following; the job runs on: lmbatch jobs stop {job_id}")
        return 130
    info = client.get_job_info(job_id)
    echo(f"job {describe(job_id, info)}")
    return 0 if info.status == JobStatus.SUCCEEDED else 1


def describe(job_id: str, info) -> str:
    """'ID STATUS', and why, when the cluster says: its first line, without the
    copy of the job's last logs Ray appends (they were printed as they came)."""
    message = (info.message or "").splitlines()[0] if info.message else ""
    message = message.split(", last available logs")[0]
    return f"{job_id} {info.status.value}" + (f": {message}" if message else "")


def job_info(client, job_id: str):
    """The job's JobDetails.

    Raises:
        UserError: naming the id when the cluster has no such job.
    """
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise UserError("JOB_ID", f"the cluster has no job {job_id!r}") from None
        raise


def stop_job(client, job_id: str, timeout_s: float = 60.0) -> str:
    """Ask the cluster to stop the job; its status once it ended (or the timeout)."""
    info = job_info(client, job_id)
    if info.status.is_terminal():
        return f"had already ended: {info.status.value}"
    client.stop_job(job_id)
    deadline = time.monotonic() + timeout_s
    while not info.status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        info = job_info(client, job_id)
    return info.status.value


def runs_here(client) -> bool:
    """Whether every node of the cluster is this machine (its IPs are this
    machine's), as the dashboard lists them; a cluster behind a tunnel is not."""
    import psutil

    ips: set[str] = set()
    for _ in range(NODE_LIST_TRIES):  # a head that just started may list none yet
        response = client._do_request("GET", "/api/v0/nodes")
        nodes = response.json().get("data", {}).get("result", {}).get("result", [])
        ips = {n.get("node_ip") or "" for n in nodes}
        if ips:
            break
        time.sleep(0.5)
    mine = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    return bool(ips) and all(ip in mine or is_loopback_host(ip) for ip in ips)


def cluster_paths(spec: Spec, here: bool, shared: bool = False) -> Spec:
    """Local paths made absolute (the job runs in another directory). On a cluster
    not on this machine a local path reaches the nodes only on storage every node
    mounts at the same path: refused unless ``--shared-paths`` says it is there.

    Raises:
        UserError: naming the flag of the first local path sent off this machine.
    """
    changes = {}
    for name, flag in spec.path_fields().items():
        value = getattr(spec, name)
        paths = value if isinstance(value, tuple) else (value,)
        for path in paths:
            if not (here or shared or is_uri(path)):
                raise UserError(
                    flag,
                    f"{path} is a local path, which the cluster's nodes cannot read: "
                    "give a URI (s3://, gs://, file:// on a shared mount), or pass "
                    "--shared-paths if every node mounts it at the same path",
                )
        fixed = tuple(absolute(p) for p in paths)
        changes[name] = fixed if isinstance(value, tuple) else fixed[0]
    return spec.model_copy(update=changes)
