"""The package's shape: the library never imports its front ends, the shipped configs cannot
drift from the repository's, and a plain (non-editable) install works from any folder."""

import ast
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import LAUNCH_PORT, ROOT

from ds_upcycle.config import CONFIG_DIR, load_run_config, resolve_config, shipped_configs

PACKAGE = ROOT / "ds_upcycle"


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_the_library_never_imports_the_tools():
    library = [p for p in PACKAGE.rglob("*.py") if "tools" not in p.relative_to(PACKAGE).parts]
    assert len(library) > 10
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in _imported_modules(p) if m.startswith("ds_upcycle.tools"))
        for p in library
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_repository_configs_are_the_shipped_configs():
    top = ROOT / "ds_configs"
    files = sorted(p.relative_to(top) for p in top.rglob("*.json"))
    shipped = sorted(p.relative_to(CONFIG_DIR) for p in CONFIG_DIR.rglob("*.json"))
    assert files == shipped and len(files) >= 9
    for rel in files:
        assert (top / rel).read_bytes() == (CONFIG_DIR / rel).read_bytes(), rel


def test_configs_are_addressable_by_name_and_described():
    assert resolve_config("cpu_debug_zero2_ep2") == CONFIG_DIR / "cpu_debug_zero2_ep2.json"
    assert resolve_config("cpu_debug_zero2_ep2.json") == CONFIG_DIR / "cpu_debug_zero2_ep2.json"
    for name, path in shipped_configs().items():
        assert load_run_config(name).description, f"{name} has no ds_upcycle.description"
        assert load_run_config(path).source == str(path)
    with pytest.raises(
        ValueError, match=r"config file 'nope' does not exist .* one of: .*ablations/drop, .*cpu_debug_zero2_ep2"
    ):
        resolve_config("nope")


@pytest.mark.slow
def test_plain_install_runs_from_outside_the_repository(tmp_path):
    """pip install (not -e) into a fresh venv that sees the heavy dependencies already installed;
    then, from a folder outside the repository: configs, make-tiny, and a short training run."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
               "--no-build-isolation", str(ROOT)]  # fmt: skip
    subprocess.run(install, check=True, env=env, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()

    def cli(*args, **kwargs):
        proc = subprocess.run([str(env_dir / "bin" / "ds-upcycle"), *args], cwd=work, env=env, text=True,
                              capture_output=True, timeout=600, **kwargs)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    where = subprocess.run([str(python), "-c", "import ds_upcycle; print(ds_upcycle.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert where.startswith(str(env_dir)), where  # the installed copy, not the checkout
    assert "cpu_debug_zero2_ep2" in cli("configs")
    cli("make-tiny")
    cli("train", "cpu_debug_zero2_ep2", "--num-gpus", "2", "--master-port", str(LAUNCH_PORT), "--train.steps=2",
        "--train.save_every=0", "--log.wandb=disabled")  # fmt: skip
    assert (work / "runs" / "cpu_debug" / "summary.json").is_file()
