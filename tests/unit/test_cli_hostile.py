"""The CLI's output is safe in a terminal and its --json output is JSON, whatever Redis holds."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway_breaker import cli

HOSTILE = [
    "\x1b]0;owned\x07",  # OSC: sets the terminal's title
    "\x1b[2J\x1b[31mred",  # CSI: clears the screen
    "\x9b31m",  # C1 CSI
    "\x85next line",  # C1 NEL
    "abc\u202edcba",  # bidi override
    "\u2066isolate\u2069",
    "\rover\x08written\x00",
]


def _no_controls(text: str) -> None:
    for ch in text:
        if ch == "\n":
            continue
        code = ord(ch)
        assert code >= 0x20, repr(text)
        assert not 0x7F <= code <= 0x9F, repr(text)
        assert ch not in "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


@pytest.mark.parametrize("value", HOSTILE)
def test_history_and_events_print_control_characters_escaped(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    event: dict[str, Any] = {
        "at": 1_700_000_000.0,
        "service": "sona",
        "from": "closed",
        "to": "open",
        "cause": "manual",
        "origin": "manual",
        "instance": value,
        "version": 3,
        "failure_count": 0,
        "reason": value,
    }
    cli.emit(cli.format_history([event]))
    cli.emit(cli.format_event(event))
    manual = {"mode": "forced_open", "until": None, "reason": value}
    view = {"service": "sona", "state": "open", "failure_count": 0, "version": 1, "manual": manual}
    cli.emit(cli.format_status([view]))
    out = capsys.readouterr().out
    _no_controls(out)
    assert "\\x1b" in out or "\\x9b" in out or "\\x85" in out or "\\u20" in out or "\\r" in out


def test_json_output_has_no_nan_or_infinity(capsys: pytest.CaptureFixture[str]) -> None:
    cli._print_json({"rate": float("nan"), "times": [float("inf"), -float("inf"), 1.5]})
    out = capsys.readouterr().out

    def refuse(name: str) -> Any:
        raise ValueError(name)

    doc = json.loads(out, parse_constant=refuse)
    assert doc == {"rate": None, "times": [None, None, 1.5]}
