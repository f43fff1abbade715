"""The package: one namespace, imports that run one way, and a wheel install that
submits a job as an editable checkout does."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from ray_head import start_head

ROOT = Path(__file__).resolve().parents[1]
# Who may import whom: jobs -> optimize -> actors; errors is below them all.
ALLOWED = {
    "errors": set(),
    "actors": {"errors"},
    "optimize": {"actors", "errors"},
    "jobs": {"optimize", "actors", "errors"},
}


def imported_parts(path: Path) -> set[str]:
    """The lmbatch parts a module imports (at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "lmbatch" and len(parts) > 1:
                found.add(parts[1])
            elif parts[0] in ALLOWED or parts[0] in ("tests", "benchmarks"):
                found.add(f"bare {parts[0]}")
    return found


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_imports_run_one_way(part):
    for path in sorted((ROOT / part).glob("*.py")):
        wrong = imported_parts(path) - ALLOWED[part] - {part}
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def bare_python(root: Path) -> tuple[Path, Path]:
    """(python, its site-packages) of a new environment that sees this one's
    dependencies (torch, Ray...) but not its editable lmbatch: a .pth file adds this
    environment's site-packages as a plain path, so its import hooks never run."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(root)], check=True
    )
    site = next((root / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root / "bin" / "python", site


@pytest.fixture(scope="module")
def wheel_python(tmp_path_factory) -> Path:
    """A Python where lmbatch is a plain (wheel) install of this checkout."""
    root = tmp_path_factory.mktemp("wheel")
    python, site = bare_python(root / "env")
    # A copy of the checkout: setuptools' build/ folder would keep deleted modules.
    source = root / "source"
    skip = (".venv", ".git", ".gpu", "build", "*.egg-info", "__pycache__", "out")
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*skip))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--target", str(site), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return python


def run(python: Path, *args: str, cwd: Path, env=None, timeout: int = 300):
    return subprocess.run(
        [str(python), *args], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_a_wheel_install_has_one_namespace(wheel_python, tmp_path):
    done = run(
        wheel_python,
        "-c",
        "import lmbatch.jobs.cli as c, importlib.util as u; print(c.__file__);"
        "print(u.find_spec('jobs'), u.find_spec('actors'), u.find_spec('optimize'))",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    where, bare = done.stdout.splitlines()
    assert where.startswith(str(wheel_python.parents[1]))  # the wheel's copy
    assert bare == "None None None"
    helped = run(wheel_python, "-m", "lmbatch.jobs.cli", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "infer" in helped.stdout
    told = run(wheel_python, "-m", "lmbatch.jobs.cli", "--version", cwd=tmp_path)
    assert told.returncode == 0, told.stderr[-2000:]
    assert told.stdout.startswith("lmbatch 0.1.0 (ray ")  # from the wheel's metadata
    assert "torch " in told.stdout and "bitsandbytes " in told.stdout


@pytest.mark.cluster
def test_a_wheel_install_submits_a_job(wheel_python, tiny_models, corpus, tmp_path):
    """The head runs where lmbatch is not installed at all: the job imports the
    package the submission shipped."""
    head_python, _ = bare_python(tmp_path / "head-env")
    head = start_head(tmp_path / "head", python=head_python)
    try:
        done = run(
            wheel_python, "-m", "lmbatch.jobs.cli", "infer",
            "--model", tiny_models["bert"], "--task", "embed",
            "--input", corpus["parquet"], "--output", str(tmp_path / "out"),
            "--address", head.address,
            cwd=tmp_path, env=head.client_env(),
        )  # fmt: skip
    finally:
        head.stop()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "rows 120" in done.stdout and "SUCCEEDED" in done.stdout
