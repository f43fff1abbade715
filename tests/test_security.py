"""Security defaults: no remote code unless asked, dashboards on loopback. (Pickles,
YAML safe-loading, Serve on loopback and tokens for remote clusters are tested beside
the features they guard: test_cli_errors, test_recipe, test_serve, test_cluster.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from actors.errors import UserError
from actors.loading import inspect_model

LISTENERS = """
import json, os, psutil
from jobs.infer import ray_session
with ray_session(None):
    tree = psutil.Process().children(recursive=True)
    dashboards = {p.pid for p in tree if "dashboard" in " ".join(p.cmdline())}
    bound = [c.laddr.ip for c in psutil.net_connections("inet")
             if c.status == psutil.CONN_LISTEN and c.pid in dashboards]
print(json.dumps(bound))
"""


def test_remote_code_is_refused_unless_asked(tiny_models):
    with pytest.raises(UserError) as e:
        inspect_model(tiny_models["oom_150"], "embed")
    assert e.value.where == "--trust-remote-code" or "--trust-remote-code" in str(
        e.value
    )
    assert inspect_model(tiny_models["oom_150"], "embed", trust_remote_code=True)


def test_the_embedded_rays_dashboard_listens_on_loopback_only():
    done = subprocess.run(
        [sys.executable, "-c", LISTENERS], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    bound = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(ip in ("127.0.0.1", "::1") for ip in bound), bound
