"""setup.py: the metadata, and a wheel that carries the package, the script and the man pages.

Builds run in a copy of the sources under tmp_path, so no build/ or *.egg-info is left in
the checkout. The wheel is built offline (`--no-build-isolation --no-index`), which
needs setuptools' `bdist_wheel`: the `wheel` package, or setuptools 70.1 and later.
Without it the wheel test is skipped; the metadata test always runs.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("setup.py", "dario.py", "README.md", "dario_lib", "man")


def version():
    with open(os.path.join(ROOT, "dario_lib", "__init__.py"), encoding="utf-8") as fh:
        return re.search(r'__version__ = "(.+)"', fh.read()).group(1)


def copy_sources(dest):
    os.makedirs(dest)
    for name in SOURCES:
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest)
    return dest


def can_build_wheels_offline():
    if importlib.util.find_spec("wheel") is not None:
        return True
    import setuptools
    major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1)


def test_setup_metadata(tmp_path):
    src = copy_sources(str(tmp_path / "src"))
    script = (
        "import json\n"
        "from distutils.core import run_setup\n"
        "d = run_setup('setup.py', stop_after='init')\n"
        "print(json.dumps({'name': d.get_name(), 'version': d.get_version(),\n"
        "  'py_modules': d.py_modules, 'packages': d.packages, 'data_files': d.data_files,\n"
        "  'entry_points': d.entry_points, 'install_requires': d.install_requires,\n"
        "  'extras_require': d.extras_require, 'python_requires': str(d.python_requires)}))\n"
    )
    result = subprocess.run([sys.executable, "-c", "import setuptools\n" + script], cwd=src,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    meta = json.loads(result.stdout.strip().splitlines()[-1])
    assert meta["name"] == "dario" and meta["version"] == version()
    assert meta["py_modules"] == ["dario"] and meta["packages"] == ["dario_lib"]
    assert meta["entry_points"] == {"console_scripts": ["dario = dario_lib.cli:main"]}
    assert meta["data_files"] == [["share/man/man1", ["man/dario.1"]],
                                  ["share/man/man5", ["man/dario-config.5"]]]
    assert meta["install_requires"] == ["requests>=2.28", "urllib3>=1.26"]
    assert set(meta["extras_require"]["test"]) == {"pytest", "hypothesis", "anthropic", "openai"}
    assert meta["python_requires"] == ">=3.10"
    assert not os.path.exists(os.path.join(ROOT, "dario.egg-info"))


@pytest.mark.skipif(not can_build_wheels_offline(),
                    reason="no bdist_wheel offline: needs the `wheel` package or setuptools >= 70.1")
def test_wheel_holds_package_script_and_man_pages(tmp_path):
    src = copy_sources(str(tmp_path / "src"))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(out), "."],
        cwd=src, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    wheel = out / f"dario-{version()}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = zf.read(f"dario-{version()}.dist-info/entry_points.txt").decode()
    data = f"dario-{version()}.data/data/share/man/"
    assert {"dario.py", "dario_lib/cli.py", "dario_lib/service.py",
            data + "man1/dario.1", data + "man5/dario-config.5"} <= names
    assert not any(name.startswith("tests/") for name in names)
    assert re.search(r"^dario = dario_lib\.cli:main$", entry_points, re.M)
