"""``lmbatch serve``: the infer job's model behind HTTP, batched by Ray Serve.

    ServeSpec --prepare_serve (model, task, flags checked)--> ServePlan
              --run_serve--> serve.start(host, port) + serve.run(Endpoint) until Ctrl-C

Bound to 127.0.0.1 unless ``--host`` says otherwise: a model endpoint reachable from
the network is a choice, not a default.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from lmbatch.actors.model_files import fetch_model
from lmbatch.actors.model_info import PAIR_TASKS, ModelInfo, inspect_model
from lmbatch.actors.predict import PredictorConfig
from lmbatch.actors.serve import Endpoint, EndpointConfig
from lmbatch.actors.tokenize import TokenizeConfig, with_backend
from lmbatch.errors import UserError
from lmbatch.jobs.cluster import gpu_view
from lmbatch.jobs.gpus import choose_device, per_gpu
from lmbatch.jobs.infer import model_spec, tokenize_settings
from lmbatch.jobs.pool import gpu_fraction
from lmbatch.jobs.session import ray_session
from lmbatch.jobs.spec import (
    ServeSpec,
    check_task_flags,
    check_tokenizer,
    max_length_of,
    prompt_of,
)
from lmbatch.jobs.submit import is_loopback_host


@dataclass(frozen=True)
class ServePlan:
    spec: ServeSpec
    info: ModelInfo
    model_dir: str  # --model, or its weights-free copy on this machine (a URI)
    max_length: int
    tokenize: TokenizeConfig  # with the tokenizer's definition (with_backend)
    prompt: str = ""  # put before every text (embed; prompt_of)


def prepare_serve(spec: ServeSpec) -> ServePlan:
    """Check every flag against the model; nothing is started.

    Raises:
        UserError: naming the flag at fault.
    """
    model_dir = fetch_model(spec.model, weights=False)
    info = inspect_model(
        model_dir, spec.task, spec.trust_remote_code, spec.allow_pickle, spec.precision
    )
    max_length = max_length_of(spec, info, spec.max_new_tokens)
    check_task_flags(spec, info)
    check_tokenizer(spec, model_dir)
    prompt = prompt_of(spec, info)
    # What only the tokenizer tells (no room for a text), before Ray starts: serve's
    # driver imports torch anyway (the Endpoint's Predictor).
    tokenize = with_backend(tokenize_settings(spec, info, max_length, prompt))
    return ServePlan(spec, info, model_dir, max_length, tokenize, prompt)


def endpoint_config(plan: ServePlan, threads: int, device: str) -> EndpointConfig:
    spec = plan.spec
    return EndpointConfig(
        predictor=PredictorConfig(
            model=model_spec(spec),
            info=plan.info,
            device=device,
            threads=threads,
            max_new_tokens=spec.max_new_tokens,
            max_length=plan.max_length,
            prompt=plan.prompt,
            encoding=spec.encoding(),
            chunk=spec.on_long == "chunk",
            sampling=spec.sampling(),
            stop=spec.stop,
            actors_per_node=spec.replicas,
            share_flag="--replicas",
        ),
        tokenize=plan.tokenize,
        max_batch_size=spec.max_batch_size,
        batch_wait_ms=spec.batch_wait_ms,
    )


def deploy(plan: ServePlan, threads: int | None = None) -> str:
    """Start Serve on the current Ray and deploy the endpoint; return its URL."""
    from ray import serve

    spec = plan.spec
    threads = threads or max(1, (os.cpu_count() or 2) // spec.replicas)
    device, replica = replica_resources(plan)
    serve.start(http_options={"host": spec.host, "port": spec.port})
    app = Endpoint.options(
        num_replicas=spec.replicas,
        # Serve's default of 5 requests in flight per replica would cap every batch
        # at 5 texts; let twice a batch queue up so the next one fills meanwhile.
        max_ongoing_requests=max(16, 2 * spec.max_batch_size),
        ray_actor_options=replica,
    ).bind(endpoint_config(plan, threads, device))
    serve.run(app, name="lmbatch", route_prefix="/")
    return f"http://{spec.host}:{spec.port}/"


def replica_resources(plan: ServePlan) -> tuple[str, dict]:
    """(device, Ray options) of each replica: on GPUs, its share of one, packed by
    the model's footprint as infer actors are, so replicas spread over the GPUs.

    Raises:
        UserError: naming ``--replicas`` when they do not fit the cluster's GPUs.
    """
    spec = plan.spec
    view = gpu_view()
    device = choose_device(spec.device, spec.precision, plan.info, view)
    if device == "cpu":
        return device, {"num_cpus": 1}
    packed = per_gpu(plan.model_dir, plan.info, spec.precision, None, view)
    if spec.replicas > view.most * packed:
        raise UserError(
            "--replicas",
            f"{spec.replicas} replicas at {packed} per GPU; "
            f"the cluster can have {view.most} GPUs",
        )
    cpus = min(1.0, view.cpus_per_gpu / packed)
    return device, {"num_cpus": cpus, "num_gpus": gpu_fraction(packed)}


def check_listen(host: str, port: int) -> None:
    """Whether this machine can listen on ``host:port``, before Ray starts: Serve's
    proxy binds it only after Ray and the replicas are up, and fails with a
    traceback (another server on the port, an address not this machine's).

    Raises:
        UserError: naming ``--port`` or ``--host``.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn
        try:
            probe.bind((host, port))
        except OSError as e:
            flag = "--port" if e.errno in (errno.EADDRINUSE, errno.EACCES) else "--host"
            reason = e.strerror or str(e)
            raise UserError(flag, f"cannot listen on {host}:{port}: {reason}") from None


def run_serve(plan: ServePlan, address: str | None, echo: Callable) -> None:
    """Serve until interrupted, then take the endpoint down. On an embedded Ray
    (no ``address``) the proxy listens here: its address is checked first."""
    from ray import serve

    if address is None:
        check_listen(plan.spec.host, plan.spec.port)
    if not is_loopback_host(plan.spec.host):
        echo(
            f"warning: --host {plan.spec.host} exposes the model to the network; "
            "anyone who reaches the port can use it",
            err=True,
        )
    with ray_session(address):
        url = deploy(plan)
        echo(f"serving {plan.spec.model} ({plan.spec.task}) at {url}")
        echo(f'POST {url} {{"inputs": ["text", ...]}}; GET {url}stats; Ctrl-C stops')
        if plan.spec.task == "score" and plan.spec.chat_template:
            echo('inputs are [message, answer] pairs: {"inputs": [["q", "a"], ...]}')
        elif plan.spec.task in PAIR_TASKS:
            echo('text pairs too: {"inputs": [["first", "second"], ...]}')
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            echo("stopping")
        finally:
            serve.shutdown()
