"""The built wheel carries what an installed package needs: the typing marker, the license, one version."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import dash_shampoo

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_has_py_typed_the_license_and_the_package_version(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("dash_shampoo-*.whl")
    assert wheel.name.startswith(f"dash_shampoo-{dash_shampoo.__version__}-")  # one source: __init__.py
    names = zipfile.ZipFile(wheel).namelist()
    assert "dash_shampoo/py.typed" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: MIT" in metadata
