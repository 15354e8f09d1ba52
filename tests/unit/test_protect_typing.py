"""`protect` keeps the decorated function's signature for mypy --strict.

tests/typing/protect_types.py holds `assert_type` checks and calls mypy must reject; mypy runs
on it here, so a change that loses the types fails the suite.
"""

from __future__ import annotations

from pathlib import Path

from mypy import api

TYPING_CASES = Path(__file__).resolve().parents[1] / "typing" / "protect_types.py"


def test_protect_keeps_signatures_for_mypy() -> None:
    out, err, status = api.run(["--strict", str(TYPING_CASES)])
    assert status == 0, out + err
