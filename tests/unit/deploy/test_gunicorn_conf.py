"""gunicorn.conf.py read as the master reads it: its settings come from the gateway's config."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pytest
from servers import ROOT

from app.config import WORKER_CONNECTIONS, last_good


def master_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str, **env: str
) -> dict[str, Any]:
    """The module namespace of gunicorn.conf.py on a first start with ``toml`` as the config.
    Everything it sets in the environment is put back after the test."""
    config = tmp_path / "gateway.toml"
    config.write_text(toml, encoding="utf-8")
    monkeypatch.setenv("GATEWAY_CONFIG", str(config))
    monkeypatch.setenv("GATEWAY_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    for name in ("GATEWAY_LOG_LEVEL", "GATEWAY_WORKER_CONNECTIONS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(last_good._held, "settings", None)  # a first start, not a reload
    return runpy.run_path(str(ROOT / "gunicorn.conf.py"))


def test_gunicorns_log_level_is_the_config_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gunicorn read GATEWAY_LOG_LEVEL alone, so a log_level in the file left it at info."""
    assert master_settings(tmp_path, monkeypatch, 'log_level = "debug"\n')["loglevel"] == "debug"


def test_gunicorns_log_level_follows_the_environment_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = 'log_level = "debug"\n'
    namespace = master_settings(tmp_path, monkeypatch, toml, GATEWAY_LOG_LEVEL="warning")
    assert namespace["loglevel"] == "warning"


def test_worker_connections_default_is_the_one_the_app_sizes_its_pools_by(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert master_settings(tmp_path, monkeypatch, "")["worker_connections"] == WORKER_CONNECTIONS
