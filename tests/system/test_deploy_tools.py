"""The offline tools that judge the shipped deployment files: ``systemd-analyze
verify``/``security --offline=true``, ``gunicorn --check-config`` with the unit's own command
line, and ``nginx -t`` (the directives themselves: tests/unit/deploy/test_deploy_units.py).

systemd-analyze is skipped when absent; nginx follows test_nginx.py (required when CI is set).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess

import pytest
from servers import GUNICORN, ROOT
from systemd_unit import UNIT, environment, one
from test_nginx import make_prefix, nginx_check, require_nginx, write_config

INSTALL_DIR = "/opt/anthropic-gateway"
RUNTIME_DIR = "/run/anthropic-gateway"
# systemd-analyze security --offline=true scored 1.1 on systemd 252; small margin for versions
# that weigh settings differently.
MAX_EXPOSURE = 1.3


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return binary


def test_systemd_analyze_verify(systemd_analyze, tmp_path):
    """verify also checks that ExecStart exists. The install path does not exist here, so a
    copy of the unit points ExecStart at this checkout's gunicorn; nothing else changes."""
    text = UNIT.read_text()
    production = f"ExecStart={INSTALL_DIR}/.venv/bin/gunicorn "
    assert production in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(production, f"ExecStart={GUNICORN} "))
    result = subprocess.run(
        [systemd_analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert UNIT.name not in output, output


def test_systemd_analyze_security_score(systemd_analyze):
    result = subprocess.run(
        [systemd_analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_gunicorn_check_config_with_the_units_command_line(tmp_path):
    """The unit's ExecStart arguments and Environment parse, with the shipped example config."""
    argv = shlex.split(one("ExecStart"))
    argv = [str(GUNICORN), *(str(tmp_path) if arg == RUNTIME_DIR else arg for arg in argv[1:])]
    env = {
        **os.environ,
        **environment(),
        "GATEWAY_CONFIG": str(ROOT / "deploy" / "gateway.example.toml"),
        "BACKEND_API_KEY": "placeholder",
    }
    result = subprocess.run(
        [*argv[:-1], "--check-config", argv[-1]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_nginx_accepts_the_generated_test_config():
    binary = require_nginx()
    prefix = make_prefix()
    try:
        result = nginx_check(binary, write_config(prefix, gateway_port=8082))
    finally:
        shutil.rmtree(prefix, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr
