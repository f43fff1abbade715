"""Security defaults: no remote code unless asked, dashboards on loopback. (Pickles,
YAML safe-loading, Serve on loopback and tokens for remote clusters are tested beside
the features they guard: test_cli_errors, test_recipe, test_serve, test_cluster.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmbatch.actors.model_info import inspect_model
from lmbatch.errors import UserError

PROBE = """
import json, socket, urllib.request, psutil
from lmbatch.jobs.session import ray_session
others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
          if a.family == socket.AF_INET and not a.address.startswith("127.")]
answers = {}
with ray_session(None):
    tree = {p.pid for p in psutil.Process().children(recursive=True)}
    ports = {c.laddr.port for c in psutil.net_connections("inet")
             if c.status == psutil.CONN_LISTEN and c.pid in tree
             and c.laddr.ip not in ("127.0.0.1", "::1")}
    for port in sorted(ports) if others else []:
        url = f"http://{others[0]}:{port}/api/jobs/"
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                answers[port] = f"{r.status} {r.read(12)!r}"
        except urllib.error.HTTPError as e:
            answers[port] = str(e.code)
        except Exception:
            answers[port] = "no http"
print(json.dumps(answers))
"""


def test_remote_code_is_refused_unless_asked(tiny_models):
    with pytest.raises(UserError) as e:
        inspect_model(tiny_models["oom_150"], "embed")
    assert e.value.where == "--trust-remote-code" or "--trust-remote-code" in str(
        e.value
    )
    assert inspect_model(tiny_models["oom_150"], "embed", trust_remote_code=True)


def test_the_embedded_ray_serves_no_unauthenticated_api_to_other_machines():
    """Ray's gRPC servers listen on every interface (token auth guards them); the
    embedded Ray starts no dashboard UI, and from another interface its HTTP ports
    answer the Jobs API only with a token (401) or are Prometheus metrics."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    if not answers:
        pytest.skip("this machine has no non-loopback IPv4 address")
    for port, answer in answers.items():
        ok = answer in ("401", "no http") or "b'# HELP" in answer
        assert ok, f"port {port} answered the Jobs API without a token: {answer}"
