"""Static checks of the shipped deployment files (deploy/systemd, deploy/nginx); the offline
tools that judge them run in tests/system/test_deploy_tools.py."""

from __future__ import annotations

import re
import shlex

import pytest
from servers import ROOT
from systemd_unit import SERVICE, UNIT, environment, one

import app.config
from app.config import build_settings

SITE = ROOT / "deploy" / "nginx" / "anthropic-gateway.conf"
GUNICORN_CONF = (ROOT / "gunicorn.conf.py").read_text()
INSTALL_DIR = "/opt/anthropic-gateway"
RUNTIME_DIR = "/run/anthropic-gateway"


# --------------------------------------------------------------------------------------------
# systemd unit
# --------------------------------------------------------------------------------------------


def conf_default(name: str) -> int:
    match = re.search(rf'_env_int\("{name}", (\w+)\)', GUNICORN_CONF)
    assert match, f"{name} default not found in gunicorn.conf.py"
    default = match.group(1)
    return int(default) if default.isdigit() else int(getattr(app.config, default))


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, f"unexpected time span {value!r}"
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


def size_bytes(value: str) -> int:
    match = re.fullmatch(r"(\d+)([KMG]?)", value, re.IGNORECASE)
    assert match, f"unexpected size {value!r}"
    return int(match.group(1)) * 1024 ** " KMG".index(match.group(2).upper() or " ")


def test_unit_runs_gunicorn_from_the_install_dir_as_a_notify_service():
    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("WorkingDirectory") == INSTALL_DIR
    argv = shlex.split(one("ExecStart"))
    assert argv[0] == f"{INSTALL_DIR}/.venv/bin/gunicorn"
    assert argv[1:3] == ["-c", "gunicorn.conf.py"] and argv[-1] == "wsgi:app"
    assert one("ExecReload") == "/bin/kill -s HUP $MAINPID"
    assert one("KillMode") == "mixed"
    assert one("Restart") == "on-failure"


def test_unit_runs_as_a_dedicated_unprivileged_user():
    user = one("User")
    assert user == "anthropic-gateway" and one("Group") == "anthropic-gateway"
    assert one("CapabilityBoundingSet") == "" and one("AmbientCapabilities") == ""


def test_unit_config_and_secrets():
    assert one("EnvironmentFile") == "-/etc/anthropic-gateway/env"
    env = environment()
    assert env["GATEWAY_CONFIG"] == "/etc/anthropic-gateway/gateway.toml"
    assert env["GATEWAY_BIND"].startswith(("127.0.0.1:", f"unix:{RUNTIME_DIR}/"))
    secret = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)
    assert not [name for name in env if secret.search(name)], "secrets belong in the env file"


def test_stop_timeout_outlasts_the_graceful_drain():
    graceful = int(
        environment().get("GATEWAY_GRACEFUL_TIMEOUT") or conf_default("GATEWAY_GRACEFUL_TIMEOUT")
    )
    assert graceful >= 120
    assert seconds(one("TimeoutStopSec")) >= graceful + 15


def test_resource_limits():
    workers = int(environment().get("GATEWAY_WORKERS") or conf_default("GATEWAY_WORKERS"))
    connections = int(
        environment().get("GATEWAY_WORKER_CONNECTIONS")
        or conf_default("GATEWAY_WORKER_CONNECTIONS")
    )
    assert int(one("LimitNOFILE")) >= 2 * workers * connections + 1024
    assert int(one("LimitNOFILE")) >= 65536
    assert size_bytes(one("MemoryMax")) >= 256 * 1024**2


def test_runtime_directory_holds_the_worker_heartbeats():
    assert one("RuntimeDirectory") == "anthropic-gateway"
    argv = shlex.split(one("ExecStart"))
    assert argv[argv.index("--worker-tmp-dir") + 1] == RUNTIME_DIR


def test_state_directory_survives_restarts_and_is_the_gateways_default():
    # systemd makes /var/lib/anthropic-gateway for the service user and passes it as
    # STATE_DIRECTORY, which app/config/loader.py takes as the default state.directory.
    assert one("StateDirectory") == "anthropic-gateway"
    assert one("StateDirectoryMode") == "0750"
    settings = build_settings({}, {"STATE_DIRECTORY": "/var/lib/anthropic-gateway"})
    assert settings.state.engine == "sqlite"
    assert settings.state.directory == "/var/lib/anthropic-gateway"


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "SystemCallArchitectures": "native",
    "UMask": "0077",
}


@pytest.mark.parametrize(("key", "value"), sorted(HARDENING.items()))
def test_hardening(key, value):
    assert one(key) == value


def test_system_call_filter():
    assert SERVICE["SystemCallFilter"][0] == "@system-service"
    assert set(" ".join(SERVICE["SystemCallFilter"][1:]).split()) >= {"~@privileged"}


# --------------------------------------------------------------------------------------------
# nginx site
# --------------------------------------------------------------------------------------------


def tokenize(text: str) -> list[str]:
    tokens = []
    pattern = re.compile(r"""\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[{};]|[^\s{};"'#]+""")
    for match in pattern.finditer(text):
        token = match.group()
        if token.isspace() or token.startswith("#"):
            continue
        if token[0] in "\"'":
            token = token[1:-1]
        tokens.append(token)
    return tokens


Block = list[tuple[list[str], "Block | None"]]  # (directive words, child block or None)


def parse_nginx(text: str) -> Block:
    tokens = iter(tokenize(text))

    def block() -> Block:
        items: Block = []
        words: list[str] = []
        for token in tokens:
            if token == ";":
                items.append((words, None))
                words = []
            elif token == "{":
                items.append((words, block()))
                words = []
            elif token == "}":
                assert not words, words
                return items
            else:
                words.append(token)
        assert not words, words
        return items

    return block()


HTTP = parse_nginx(SITE.read_text())


def directives(block: Block, name: str) -> list[list[str]]:
    return [words[1:] for words, child in block if words[0] == name and child is None]


def value(block: Block, name: str) -> str:
    found = directives(block, name)
    assert len(found) == 1, f"{name}: {found}"
    return " ".join(found[0])


def blocks(block: Block, *head: str) -> list[Block]:
    return [
        child for words, child in block if child is not None and words[: len(head)] == list(head)
    ]


def server(port: str) -> Block:
    found = [
        b for b in blocks(HTTP, "server") if any(w[0] == port for w in directives(b, "listen"))
    ]
    assert len(found) == 1
    return found[0]


TLS = server("443")


def location(*head: str) -> Block:
    found = [child for words, child in TLS if child is not None and words == ["location", *head]]
    assert len(found) == 1, head
    return found[0]


def maps() -> dict[str, tuple[str, Block]]:
    """{result variable: (source variable, block)} for every map at http level."""
    return {words[2]: (words[1], child) for words, child in HTTP if words[0] == "map" and child}


def test_upstream_keepalive_matches_gunicorn():
    (upstream,) = blocks(HTTP, "upstream", "anthropic_gateway")
    assert directives(upstream, "server")[0][0] == "127.0.0.1:8082"
    assert int(value(upstream, "keepalive")) >= 16
    # gunicorn must keep idle connections longer than nginx reuses them (docs/deploy.md §1.2).
    assert seconds(value(upstream, "keepalive_timeout")) < conf_default("GATEWAY_KEEPALIVE")


def test_stream_location_is_sse_safe():
    v1 = location("/v1/")
    assert value(v1, "proxy_pass") == "http://anthropic_gateway"
    assert value(v1, "proxy_buffering") == "off"
    assert value(v1, "proxy_cache") == "off"
    assert value(v1, "gzip") == "off"
    read_timeout = seconds(value(v1, "proxy_read_timeout"))
    assert read_timeout >= 600 and seconds(value(v1, "proxy_send_timeout")) >= 600
    # The gateway pings silent streams well inside nginx's read timeout.
    assert build_settings({}, {}).ping_interval < read_timeout
    assert value(TLS, "proxy_http_version") == "1.1"
    assert value(TLS, "proxy_request_buffering") == "on"


def test_forwarded_headers_and_request_id():
    headers = {words[0]: " ".join(words[1:]) for words in directives(TLS, "proxy_set_header")}
    assert headers["Connection"] == ""
    assert headers["Host"] == "$http_host"  # with its port: the console's origin check
    assert headers["X-Forwarded-For"] == "$proxy_add_x_forwarded_for"
    assert headers["X-Forwarded-Proto"] == "$scheme"
    request_id = headers["X-Request-ID"]
    source, mapping = maps()[request_id]
    assert source == "$http_x_request_id"
    assert value(mapping, "default") == "$request_id"
    # A location with its own proxy_set_header/add_header would drop the server's list.
    for words, child in TLS:
        if words[0] == "location":
            assert not directives(child, "proxy_set_header"), words
            assert not directives(child, "add_header"), words
    log_format = " ".join(directives(HTTP, "log_format")[0])
    assert request_id in log_format and "$request_time" in log_format
    assert all(args[1] == "anthropic_gateway" for args in directives(TLS, "access_log"))


def test_body_size_matches_the_gateway():
    assert size_bytes(value(TLS, "client_max_body_size")) >= build_settings({}, {}).max_body_bytes
    assert size_bytes(value(TLS, "client_max_body_size")) >= 32 * 1024**2


def test_rate_limits_are_keyed_on_the_api_key_and_answer_429():
    (req_zone,) = directives(HTTP, "limit_req_zone")
    (conn_zone,) = directives(HTTP, "limit_conn_zone")
    key = req_zone[0]
    assert key == conn_zone[0] and key != "$binary_remote_addr"
    source, _ = maps()[key]  # the key, or the client address for requests without one
    api_key_source, api_key_map = maps()[source]
    assert api_key_source == "$http_x_api_key"
    assert value(api_key_map, "default") == "$http_x_api_key"
    v1 = location("/v1/")
    assert directives(v1, "limit_req") and directives(v1, "limit_conn")
    assert value(v1, "limit_req_status") == "429"
    assert value(v1, "limit_conn_status") == "429"


def test_metrics_only_from_loopback():
    metrics = location("=", "/metrics")
    assert directives(metrics, "allow") == [["127.0.0.1"]]
    assert directives(metrics, "deny") == [["all"]]


def test_tls_is_mozilla_intermediate():
    assert value(TLS, "ssl_protocols") == "TLSv1.2 TLSv1.3"
    assert value(TLS, "ssl_prefer_server_ciphers") == "off"
    assert value(TLS, "ssl_session_tickets") == "off"
    for cipher in value(TLS, "ssl_ciphers").split(":"):
        assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher), cipher
    hsts = [w for w in directives(TLS, "add_header") if w[0] == "Strict-Transport-Security"]
    assert hsts and int(re.search(r"max-age=(\d+)", hsts[0][1]).group(1)) >= 63072000
    assert hsts[0][-1] == "always"
    assert "ssl" in directives(TLS, "listen")[0]


def test_plain_http_only_redirects():
    plain = server("80")
    (root,) = [b for words, b in plain if b is not None and words == ["location", "/"]]
    assert value(root, "return") == "301 https://$host$request_uri"


def test_deploy_files_name_no_address_but_loopback():
    files = [UNIT, SITE, ROOT / "deploy" / "README.md", ROOT / "deploy" / "check.sh"]
    for path in files:
        addresses = set(re.findall(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", path.read_text()))
        assert addresses <= {"127.0.0.1"}, (path.name, addresses)
