"""The fast layer's guard (tests/conftest.py): a test that starts mpirun without its marker
fails, naming the marker; with the marker it passes. Run as a real pytest session on a copy
of the conftest; marked mpi itself, since its probe starts a real mpirun."""

import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, env

PROBE = '''import subprocess
import pytest

def test_unmarked():
    subprocess.run(["mpirun", "--version"], capture_output=True, check=True)

@pytest.mark.mpi
def test_marked():
    subprocess.run(["mpirun", "--version"], capture_output=True, check=True)

def test_no_launcher():
    subprocess.run(["true"], check=True)
'''


@pytest.mark.mpi
def test_an_unmarked_test_that_starts_mpirun_fails(tmp_path):
    (tmp_path / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "tests" / "conftest.py")
    (tmp_path / "tests" / "test_probe.py").write_text(PROBE)
    (tmp_path / "setup.cfg").write_text("[tool:pytest]\nmarkers =\n    mpi: x\n    slurm: x\n    multinode: x\n"
                                        "    root: x\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rE", "-p", "no:cacheprovider", "tests"], cwd=tmp_path,
                       capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode != 0
    assert "started mpirun without its marker: add @pytest.mark.mpi" in r.stdout
    assert "ERROR tests/test_probe.py::test_unmarked" in r.stdout
    assert "3 passed, 1 error" in r.stdout  # the unmarked test's teardown fails it; the others pass
