"""The package installs under the `threelc` namespace only, from a built wheel."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

IMPORT_ALL = """
import importlib, pkgutil, sys, threelc
assert threelc.__file__.startswith(sys.prefix), threelc.__file__
names = ["threelc"] + [m.name for m in pkgutil.walk_packages(threelc.__path__, "threelc.")]
for name in names:
    importlib.import_module(name)
for sub in ("threelc.hooks", "threelc.launch", "threelc.codec", "threelc.kernels", "threelc.cli",
            "threelc.launch.examples", "threelc.launch.cluster", "threelc.launch.bench", "threelc.launch.runs"):
    assert sub in names, sub
print(len(names))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(REPO)], check=True, timeout=300)
    (path,) = out.glob("threelc-*.whl")
    return path


def test_wheel_holds_only_the_threelc_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"threelc", next(t for t in top_level if t.endswith(".dist-info"))}
    assert "threelc/hooks/__init__.py" in names and "threelc/launch/__init__.py" in names
    assert not any(name.startswith(("hooks/", "launch/", "tests/")) for name in names)


def test_wheel_installs_and_imports_in_a_fresh_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    # --system-site-packages reuses the installed torch, numpy and numba (no downloads).
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=300)
    result = subprocess.run([str(python), "-c", IMPORT_ALL], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) >= 8
    script = venv / "bin" / "threelc"
    help_text = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, check=True)
    for command in ("bench", "demo", "report", "emulate"):
        assert command in help_text.stdout
    site = pathlib.Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                       capture_output=True, text=True, check=True).stdout.strip())
    assert not (site / "hooks").exists() and not (site / "launch").exists()


def test_editable_install_maps_the_namespace():
    result = subprocess.run([sys.executable, "-c", "import threelc.hooks, threelc.launch; print(threelc.hooks.__file__)"],
                            cwd="/", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("hooks/__init__.py")
