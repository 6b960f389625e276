"""The package installs whole, not only as an editable checkout: every subpackage and the shipped job configs
(jobs/ -> pear_ray.jobs, which `pear-ray demo` reads)."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_package_list_names_every_subpackage():
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "pear_ray").rglob("__init__.py")}
    assert set(listed) == found | {"pear_ray.jobs"}


def test_a_wheel_install_carries_the_jobs_the_demo_reads(tmp_path):
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)], check=True,
                   capture_output=True)
    [wheel] = (tmp_path / "dist").glob("*.whl")
    target = tmp_path / "installed"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True)
    probe = ("import importlib.resources as r, pear_ray, pear_ray.cli as cli; "
             "from pear_ray.config import load_job; "
             "f = r.files('pear_ray.jobs') / cli.DEMO_JOB; "
             "print(pear_ray.__file__); print(f); print(load_job(f).name)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0].startswith(str(target)) and out[1].startswith(str(target))  # not the checkout
    assert out[2] == "demo"
    assert {p.name for p in (target / "pear_ray" / "jobs").glob("*.yaml")} == {p.name for p in (ROOT / "jobs").glob("*.yaml")}
