"""Install the package with its runtime dependencies at the lowest versions its ranges allow.

`make test-lowest` runs the suite in that environment. The runtime dependencies (`dependencies`
in pyproject.toml, and the `example` extra: what a user's own gateway runs on) are lowered; the
test tools of the `test` and `dev` extras stay at their locked versions, so a failure points at
the library's own lower bounds, not at an old pytest.

    python tools/lowest.py VENV        # uses $UV (default: uv on the PATH)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def main() -> int:
    venv = sys.argv[1]
    uv = os.environ.get("UV", "uv")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_name(r) for r in project["dependencies"]}
    extras = {
        _name(r)
        for extra in ("test", "dev")
        for r in project["optional-dependencies"][extra]
        if _name(r) != _name(project["name"])
    }
    locked = {
        p["name"]: p["version"]
        for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]
        if "version" in p
    }
    held = sorted((extras - runtime) & locked.keys())
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write("".join(f"{n}=={locked[n]}\n" for n in held))
    subprocess.run([uv, "venv", "--quiet", "--allow-existing", venv], check=True)
    subprocess.run(
        [
            uv,
            "pip",
            "install",
            "--quiet",
            "--python",
            venv,
            "--resolution",
            "lowest-direct",
            "-c",
            constraints.name,
            "-e",
            f"{ROOT}[dev]",
        ],
        check=True,
    )
    subprocess.run([uv, "pip", "list", "--python", venv], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
