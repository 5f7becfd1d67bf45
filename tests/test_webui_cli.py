"""`qwen-mlx webui`'s guard rails, checked before any model is loaded."""

from __future__ import annotations

import socket

import pytest

from qwen_mlx.cli.main import main


@pytest.fixture
def busy_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        yield s.getsockname()[1]


def test_listening_beyond_loopback_without_auth_warns(busy_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["webui", "--demo", "--host", "0.0.0.0", "--port", str(busy_port)]) == 2
    err = capsys.readouterr().err
    assert "warning: --host 0.0.0.0 without --auth" in err
    assert f"cannot listen on 0.0.0.0:{busy_port}" in err.strip().splitlines()[-1]


def test_auth_silences_the_warning(busy_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["webui", "--demo", "--host", "0.0.0.0", "--port", str(busy_port), "--auth", "me:pw"]) == 2
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--auth", "nopassword"], "expected user:password"),
        (["--max-kv-size", "4"], "must be larger than 4"),
        (["--max-queue", "0"], "at least 1"),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["webui", "--demo", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("qwen-mlx: error: ") and message in err[-1]
