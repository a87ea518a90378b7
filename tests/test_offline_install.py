"""The offline install of the README (a Kaggle code competition has no internet): milbench built
as a wheel into a local wheel directory, then installed from there alone (``--no-index``) into a
fresh virtual environment, whose ``milbench`` command then runs.

The dependencies' own wheels are not rebuilt here (gigabytes of torch): the fresh environment sees
this environment's packages through a path file, standing in for the wheel directory's other
wheels, so milbench is installed without its dependencies and ``pip check`` then confirms that
every dependency it declares is satisfied there."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

# End to end: runs the pipeline or a command (`pytest -m "not e2e"` leaves these out).
pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def test_a_wheel_installs_from_a_local_directory_without_an_index(tmp_path):
    source = tmp_path / "source"  # a clean copy: the build writes build/ and *.egg-info
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".milbench", "__pycache__", "*.egg-info", "build", "tests", "submissions"))
    wheels = tmp_path / "wheelhouse"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--no-index", "--wheel-dir", str(wheels), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    assert [p.name.split("-")[0] for p in wheels.glob("*.whl")] == ["milbench"]

    fresh = tmp_path / "fresh"
    venv.create(fresh, with_pip=True)
    python = fresh / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # The fresh environment's own (older) setuptools would shadow the one torch requires.
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "setuptools"],
                   capture_output=True, check=True)
    # This checkout's editable install is among those packages: the wheel replaces it here.
    installed = subprocess.run([str(python), "-m", "pip", "install", "--no-index", "--find-links",
                                str(wheels), "--force-reinstall", "--no-deps", "milbench"],
                               capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]
    assert "Successfully installed milbench" in installed.stdout
    # Every dependency milbench declares is satisfied without an index.
    checked = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True,
                             cwd=tmp_path)
    assert "milbench" not in checked.stdout, checked.stdout
    where = subprocess.run([str(python), "-c", "import milbench; print(milbench.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    assert where.startswith(str(fresh))  # the wheel's copy, not this checkout
    listed = subprocess.run([str(fresh / "bin" / "milbench"), "models"], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert listed.returncode == 0 and "mifv" in listed.stdout, listed.stderr[-2000:]
