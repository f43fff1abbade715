"""The Ray a job runs on: a fresh embedded one, or a running cluster it attaches to.

Starting Ray takes seconds, and so does importing torch and transformers, which the
driver needs next (the actors' classes). ``ray_session`` does both at once: the
imports run in a thread while ``ray.init`` waits on Ray's processes.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Iterator

import ray

from lmbatch.errors import UserError


@contextlib.contextmanager
def ray_session(address: str | None, warm: tuple[str, ...] = ()) -> Iterator[None]:
    """Attach to ``address``, or start a fresh embedded Ray and stop it afterwards.

    ``address="local"`` or None always starts a new one: a bare ``ray.init()`` would
    attach to any cluster left running on this machine, even a dead one.

    Args:
        warm: modules the job imports next, imported while Ray starts.
    """
    importing = threading.Thread(target=_import, args=(warm,), daemon=True)
    importing.start()
    if ray.is_initialized():
        importing.join()
        yield
        return
    try:
        if address and address != "local":
            attach(address)
        else:
            ray.init(
                address="local",
                num_cpus=max(2, os.cpu_count() or 2),
                include_dashboard=False,
                log_to_driver=True,
            )
    finally:
        importing.join()
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


def _import(modules: tuple[str, ...]) -> None:
    for name in modules:
        with contextlib.suppress(Exception):  # the job's own import will say why
            importlib.import_module(name)
