"""A bad setting stops the server with one clear line per problem, exit status 2, no traceback,
and never the value of a secret."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.server.settings import InvalidSettings, Settings, load_settings

SECRET = "sh0rt-s3cret"  # too short to be accepted, and must never be printed
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("SURROGATE_"):
            monkeypatch.delenv(k)


def test_a_short_token_is_one_line_without_the_token(monkeypatch, capsys):
    monkeypatch.setenv("SURROGATE_API_TOKEN", SECRET)
    with pytest.raises(SystemExit) as info:
        load_settings()
    assert info.value.code == 2
    assert isinstance(info.value, InvalidSettings)
    assert str(info.value) == "surrogate-serve: invalid setting SURROGATE_API_TOKEN: must be at least 16 characters"
    err = capsys.readouterr().err
    assert err == str(info.value) + "\n"
    assert SECRET not in err


def test_every_problem_has_its_line_and_values_of_plain_settings_are_shown(monkeypatch):
    monkeypatch.setenv("SURROGATE_API_TOKEN", SECRET)
    monkeypatch.setenv("SURROGATE_PORT", "70000")
    monkeypatch.setenv("SURROGATE_LOG_LEVEL", "loud")
    with pytest.raises(SystemExit) as info:
        load_settings(max_rank="eight")
    lines = str(info.value).splitlines()
    assert len(lines) == 4, lines
    by_name = {line.split()[3].rstrip(":"): line for line in lines}
    assert set(by_name) == {"SURROGATE_API_TOKEN", "SURROGATE_PORT", "SURROGATE_LOG_LEVEL", "SURROGATE_MAX_RANK"}
    assert all(line.startswith("surrogate-serve: invalid setting SURROGATE_") for line in lines)
    assert "65535" in by_name["SURROGATE_PORT"]
    assert "(got '70000')" in by_name["SURROGATE_PORT"]
    assert "(got 'loud')" in by_name["SURROGATE_LOG_LEVEL"]
    assert "(got 'eight')" in by_name["SURROGATE_MAX_RANK"]
    assert "got" not in by_name["SURROGATE_API_TOKEN"]
    assert SECRET not in str(info.value)


def test_token_file_problems_name_the_setting(tmp_path, capsys):
    empty = tmp_path / "tokens"
    empty.write_text("# nobody\n")
    with pytest.raises(SystemExit) as info:
        load_settings(api_token_file=empty)
    assert str(info.value) == f"surrogate-serve: invalid setting SURROGATE_API_TOKEN_FILE: {empty} holds no token"
    short = tmp_path / "short"
    short.write_text(f"{SECRET}\n")
    with pytest.raises(SystemExit) as info:
        load_settings(api_token_file=short)
    assert "must be at least 16 characters" in str(info.value)
    assert SECRET not in str(info.value) + capsys.readouterr().err


def test_good_settings_load_and_overrides_win(monkeypatch):
    monkeypatch.setenv("SURROGATE_PORT", "9001")
    monkeypatch.setenv("SURROGATE_API_TOKEN", "a-long-enough-token-0123")
    s = load_settings(max_rank=4)
    assert (s.port, s.max_rank) == (9001, 4)
    assert s.tokens() == ["a-long-enough-token-0123"]


def test_a_validation_error_of_settings_itself_hides_the_input(monkeypatch):
    """Settings() used directly (not through load_settings) raises pydantic's error, whose text
    no longer holds the inputs (pydantic shows them by default)."""
    monkeypatch.setenv("SURROGATE_API_TOKEN", SECRET)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert "16 characters" in str(info.value)
    assert SECRET not in str(info.value)
    assert "input_value" not in str(info.value)


@pytest.mark.parametrize(
    "command",
    [
        ["-c", "from service.server.settings import load_settings; load_settings()"],
        ["-m", "service"],
    ],
    ids=["load_settings", "python -m service"],
)
def test_a_process_with_a_bad_secret_exits_2_with_one_line(command):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SURROGATE_")}
    env["SURROGATE_API_TOKEN"] = SECRET
    env["SURROGATE_PORT"] = "0"
    p = subprocess.run([sys.executable, *command], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert SECRET not in p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert p.stderr.strip().splitlines() == [
        "surrogate-serve: invalid setting SURROGATE_API_TOKEN: must be at least 16 characters"
    ]


@pytest.mark.parametrize(("given", "level"), [("DEBUG", "debug"), ("debug", "debug"), ("Warning", "warning"),
                                              ("CRITICAL", "critical"), ("info", "info")])
def test_the_log_level_is_taken_in_any_case(monkeypatch, given, level):
    monkeypatch.setenv("SURROGATE_LOG_LEVEL", given)
    assert load_settings().log_level == level
    assert Settings(log_level=given).log_level == level


@pytest.mark.parametrize("given", ["LOUD", "verbose", "", "debug "])
def test_a_log_level_that_is_none_is_refused_as_given(monkeypatch, given):
    monkeypatch.setenv("SURROGATE_LOG_LEVEL", given)
    with pytest.raises(SystemExit) as info:
        load_settings()
    assert str(info.value).startswith("surrogate-serve: invalid setting SURROGATE_LOG_LEVEL: ")
    assert str(info.value).endswith(f"(got {given!r})")


def _serve(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SURROGATE_")}
    full.update({f"SURROGATE_{k.upper()}": v for k, v in env.items()})
    return subprocess.run([sys.executable, "-m", "service", *args], env=full, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize(("args", "env", "named", "got"), [
    (["--port", "99999"], {}, "--port", "99999"),
    (["--port", "65536"], {"port": "8000"}, "--port", "65536"),  # the flag wins over the variable, and is named
    (["--workers", "0"], {}, "--workers", "0"),
    (["--root-path", "api"], {}, "--root-path", None),
    ([], {"port": "99999"}, "SURROGATE_PORT", "'99999'"),
], ids=["port", "port-over-env", "workers", "root-path", "env"])
def test_a_bad_value_is_named_as_the_user_gave_it(args, env, named, got):
    p = _serve(*args, **env)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"surrogate-serve: invalid setting {named}: "), lines
    if got is not None:
        assert lines[0].endswith(f"(got {got})")
    assert "Traceback" not in p.stderr


def test_a_flag_at_its_edge_is_taken_and_one_past_is_named():
    from service.server.settings import load_settings as load

    assert load({"port": "--port"}, port=65535).port == 65535
    with pytest.raises(SystemExit) as info:
        load({"port": "--port"}, port=65536)
    assert str(info.value).startswith("surrogate-serve: invalid setting --port: ")


def test_a_real_server_runs_at_an_upper_case_log_level():
    import httpx
    from liveserver import running_server

    with running_server(log_level="DEBUG") as (base, _proc):
        r = httpx.post(base + "/v1/grad", json={"x": [-2.0, 0.0, 0.5]}, timeout=30)
        assert r.status_code == 200 and r.json()["grad"] == [0.0, 1.0, 0.5]
