"""The Ray a job runs on: a fresh embedded one, or a running cluster it attaches to.

An infer job's driver imports neither torch nor transformers (only the actors and
tasks that load a model do), so starting Ray is nearly all of its start-up.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lmbatch.errors import UserError

# The embedded Ray keeps Ray's default of token authentication on, by design
# (tests/test_security.py); Ray's notice that it is on, printed at every start, is the
# first line a user of the default local mode would read. Its warning that auth is
# off (RAY_AUTH_MODE=disabled) still shows.
TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"
TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster."


def _not_token_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(TOKEN_NOTICE)


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Attach to ``address``, or start a fresh embedded Ray and stop it afterwards.

    ``address="local"`` or None always starts a new one: a bare ``ray.init()`` would
    attach to any cluster left running on this machine, even a dead one.
    """
    if ray.is_initialized():
        # A Ray this process runs jobs on (a notebook's, the tests'): a failed job's
        # actors live until Python collects its exception's reference cycles (the
        # traceback's frames hold Ray Data's pool), and keep their CPUs and GPUs from
        # the next job, which may wait for them for ever. Collect them first.
        gc.collect()
        yield
        return
    if address and address != "local":
        attach(address)
    else:
        notice = logging.getLogger(TOKEN_SETUP_LOGGER)
        notice.addFilter(_not_token_notice)
        try:
            ray.init(
                address="local",
                num_cpus=max(2, os.cpu_count() or 2),
                include_dashboard=False,
                log_to_driver=True,
            )
        finally:
            notice.removeFilter(_not_token_notice)
    try:
        yield
    finally:
        ray.shutdown()


def attach(address: str) -> None:
    """Attach this process to the Ray at ``address`` (HOST:PORT or auto).

    Raises:
        UserError: naming ``--address`` when no Ray answers there.
    """
    try:
        ray.init(address=address, log_to_driver=True)
    except ConnectionError as e:
        raise UserError(
            "--address",
            f"no Ray answers at {address} ({str(e).splitlines()[0]}): is the cluster "
            "up, and is this its GCS port (6379 by default)?",
        ) from None


def this_node() -> NodeAffinitySchedulingStrategy:
    """Ray's option that keeps an actor or task on the driver's node."""
    return NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False
    )
