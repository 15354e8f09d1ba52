"""Helpers for the deployment tests: the repository's files and the validators' executables."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
FLEET_SCRIPT = REPO_ROOT / "deploy" / "fleet.py"


def tool(name: str) -> str:
    """The executable `name` from this interpreter's environment (or the PATH), else a failure.

    The validators come with the `dev` extra (`pip install -e '.[dev]'`); a missing one fails the
    test, it never skips it.
    """
    for directory in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        candidate = directory / name
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; the dev extra brings it: pip install -e '.[dev]'")
    return found


def load_fleet() -> ModuleType:
    """deploy/fleet.py as a module (it is a script, not part of a package)."""
    name = "gateway_breaker_deploy_fleet"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, FLEET_SCRIPT)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def fleet() -> ModuleType:
    return load_fleet()
