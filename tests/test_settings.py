"""The settings object (orchestrator/settings.py): precedence default < file < environment <
command line, one message per problem, secrets masked, and `icl serve --print-config`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from icl.cli import app
from icl.orchestrator.settings import ClientSettings, ServeSettings, SettingsProblem

pytestmark = pytest.mark.unit

SECRET = "milvus-password-that-must-not-show"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ICL_ variable of the caller's shell leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("ICL_"):
            monkeypatch.delenv(name)


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "icl.toml"
    path.write_text(text)
    return path


def test_precedence_default_file_env_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _file(
        tmp_path,
        "[serve]\nport = 6000\nmetrics_port = 9100\ncollection = 'from_file'\nqueue = 3\n",
    )
    monkeypatch.setenv("ICL_METRICS_PORT", "9200")
    monkeypatch.setenv("ICL_COLLECTION", "from_env")
    s = ServeSettings.load(config, collection="from_cli")
    assert s.grace_s == 30.0  # default
    assert (s.port, s.queue) == (6000, 3)  # file
    assert s.metrics_port == 9200  # environment over file
    assert s.collection == "from_cli"  # command line over environment and file
    assert s.concurrency.queue == 3


def test_existing_environment_variables_keep_working(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "ICL_MLLM_MODEL": "mllm_slow",
        "ICL_MLLM_TIMEOUT": "1.5",
        "ICL_METRICS_PORT": "9300",
        "ICL_LOG_FORMAT": "json",
        "ICL_HEALTH_POLL_S": "0.2",
        "ICL_GRACE_S": "25",
        "ICL_MILVUS_TOKEN": SECRET,
    }.items():
        monkeypatch.setenv(name, value)
    s = ServeSettings.load()
    assert (s.mllm_model, s.mllm_timeout, s.metrics_port) == ("mllm_slow", 1.5, 9300)
    assert (s.log_format, s.health_poll_s, s.grace_s) == ("json", 0.2, 25.0)
    assert s.milvus_token.get_secret_value() == SECRET
    assert SECRET not in repr(s) and SECRET not in s.render()


def test_every_problem_is_reported_once_with_where_to_set_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ICL_MILVUS_TOKEN", SECRET)
    monkeypatch.setenv("ICL_LOG_FORMAT", "xml")
    with pytest.raises(SettingsProblem) as info:
        ServeSettings.load(
            port=70_000,
            max_thi_in_flight=0,
            tokens_file=tmp_path / "missing.toml",
            health_poll_s=0.0,
        )
    problems = info.value.problems
    assert len(problems) == 5, problems
    text = "\n".join(problems)
    for name in ("port", "max_thi_in_flight", "tokens_file", "health_poll_s", "log_format"):
        assert sum(p.startswith(f"{name} (") for p in problems) == 1, (name, problems)
    assert "ICL_PORT" in text and "--max-thi-in-flight" in text and "70000" in text
    assert SECRET not in text


def test_tls_pairs_and_unknown_file_keys(tmp_path: Path) -> None:
    cert = _file(tmp_path, "not really a certificate")
    with pytest.raises(SettingsProblem, match="both a certificate"):
        ServeSettings.load(tls_cert=cert)
    with pytest.raises(SettingsProblem, match="has no setting 'prot'"):
        ServeSettings.load(_file(tmp_path, "[serve]\nprot = 1\n"))
    with pytest.raises(SettingsProblem, match=r"not valid TOML \(line 2\)"):
        ServeSettings.load(_file(tmp_path, f"[serve]\nmilvus_token = {SECRET}\n"))
    with pytest.raises(SettingsProblem, match="cannot read config file"):
        ServeSettings.load(tmp_path / "absent.toml")


def test_client_settings_from_file_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _file(tmp_path, "[client]\naddress = 'search.example:443'\ntimeout = 5\n")
    monkeypatch.setenv("ICL_TOKEN", "client-token-of-sixteen-chars")
    c = ClientSettings.load(config, timeout=2.5)
    assert (c.address, c.timeout, c.uses_tls) == ("search.example:443", 2.5, False)
    assert c.token.get_secret_value() == "client-token-of-sixteen-chars"
    assert "client-token" not in c.render() and "client-token" not in repr(c)
    with pytest.raises(SettingsProblem, match="go together"):
        ClientSettings.load(cert_file=config)


def test_print_config_shows_effective_values_with_secrets_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = _file(tmp_path, "[tokens.a]\ntoken = 'x'\n")
    monkeypatch.setenv("ICL_MILVUS_TOKEN", SECRET)
    monkeypatch.setenv("ICL_PORT", "6001")
    config = tmp_path / "serve.toml"
    config.write_text("[serve]\nport = 6000\nmax_in_flight = 6\nthi_queue = 2\n")
    result = CliRunner().invoke(
        app,
        [
            *("serve", "--print-config", "--config", str(config)),
            *("--tokens-file", str(tokens), "--max-in-flight", "7"),
        ],
    )
    assert result.exit_code == 0, result.output
    out = result.output
    # file < environment < command line
    assert "thi_queue = 2" in out and "port = 6001" in out and "max_in_flight = 7" in out
    assert f'tokens_file = "{tokens}"' in out  # the path; its tokens are not read here
    assert 'milvus_token = "********"' in out and SECRET not in out
    # What it prints reads back as a settings file.
    again = ServeSettings.load(_file(tmp_path, out.replace('"********"', '""')))
    assert (again.port, again.max_in_flight) == (6001, 7)


def test_invalid_settings_exit_2_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICL_QUEUE_WAIT_S", "-1")
    result = CliRunner().invoke(app, ["serve", "--port", "70000"])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: invalid settings:"), lines
    assert "port (" in lines[0] and "queue_wait_s (" in lines[0]


def test_settings_import_no_ml_core_and_no_server_clients() -> None:
    code = (
        "import sys, icl.orchestrator.settings\n"
        "heavy = [m for m in ('torch', 'numpy', 'PIL', 'tritonclient', 'pymilvus', 'grpc',"
        " 'icl.models', 'icl.thi', 'icl.orchestrator.server') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
