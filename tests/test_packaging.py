"""One import root: the folders map under `converge` (pyproject.toml), and an installed wheel adds
only `converge` to site-packages, with a working console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGE_DIRS = PYPROJECT["tool"]["setuptools"]["package-dir"]


def test_every_package_folder_is_listed_and_mapped_under_converge() -> None:
    """A package folder missing from the list would be left out of the wheel (an editable install would
    still find it), so a regular install would break where the tests pass."""
    found = set()
    for name, folder in PACKAGE_DIRS.items():
        assert name.startswith("converge.") and name.count(".") == 1
        for init in (REPO / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((name, *parts)))
    assert sorted(PYPROJECT["tool"]["setuptools"]["packages"]) == sorted(found)
    assert PYPROJECT["project"]["scripts"]["converge"] == "converge.service.cli:main"


def test_nothing_imports_converge_by_its_old_top_level_names() -> None:
    """With the repository on sys.path (pytest's `pythonpath`), `import service` would still work and
    load a second copy of a module beside `converge.service`; nothing of ours may do it."""
    pattern = r"^\s*(from|import) (core|service|studies|trainers|migrations)(\.| |$)"
    done = subprocess.run(["grep", "-rnE", pattern, "--include=*.py", *PACKAGE_DIRS.values(), "tests", "benchmarks",
                           "examples"], cwd=REPO, capture_output=True, text=True)
    assert done.stdout == "", done.stdout


@pytest.mark.slow
def test_the_wheel_installs_only_converge_and_its_console_script_works(tmp_path: Path) -> None:
    """Build the wheel, install it (no dependencies) in a fresh virtualenv, and run `converge --help` and
    `converge diagnose` from outside the repository. The dependencies come from this virtualenv's
    site-packages, added by a .pth file after the listing (a .pth path is searched, its own .pth files
    are not run, so this virtualenv's editable `converge` stays out)."""
    source = tmp_path / "source"  # a copy: an in-tree build would leave build/ in the repository
    for folder in PACKAGE_DIRS.values():
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    wheels = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels), str(source)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("converge-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"converge", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    installed = {p.name for p in site.iterdir()}
    assert {name for name in installed if not name.startswith("converge-")} == {"converge"}, installed
    assert not (site / "converge" / "__init__.py").exists()  # a namespace: each folder is a portion of it
    assert {p.name for p in (site / "converge").iterdir()} == set(n.split(".")[1] for n in PACKAGE_DIRS)
    assert (site / "converge" / "migrations" / "script.py.mako").is_file()

    (site / "_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run([str(python), "-c", "import converge.service.cli as c; print(c.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(site / "converge" / "service" / "cli.py"), where.stderr
    help_ = subprocess.run([str(venv / "bin" / "converge"), "--help"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=60)
    assert help_.returncode == 0 and "diagnose" in help_.stdout, help_.stderr
    diagnosed = subprocess.run([str(venv / "bin" / "converge"), "diagnose",
                                str(REPO / "examples" / "overfitting-history.json")],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert diagnosed.returncode == 0, diagnosed.stderr
    assert '"verdict": "overfitting"' in diagnosed.stdout
    upgraded = subprocess.run([str(venv / "bin" / "converge"), "db", "upgrade"], cwd=tmp_path,
                              env={**env, "CONVERGE_DATABASE_URL": f"sqlite:///{tmp_path}/c.db"},
                              capture_output=True, text=True, timeout=120)
    assert upgraded.returncode == 0, upgraded.stderr  # the migrations ship in the wheel and are found there
