"""The worker's shortcuts through gunicorn's per-request code give gunicorn's own answers."""

from __future__ import annotations

import ipaddress

import pytest
from gunicorn.config import Config
from gunicorn.http import message as gunicorn_message
from gunicorn.http import wsgi as gunicorn_wsgi

from app import gunicorn_speedups
from app.gunicorn_speedups import (
    SnapshotConfig,
    forget_base_environ,
    memoized_allow_check,
    reused_base_environ,
    snapshot_config,
)

GUNICORN_BASE_ENVIRON = gunicorn_wsgi.base_environ
GUNICORN_ALLOW_CHECK = gunicorn_message._ip_in_allow_list


def make_config(**settings) -> Config:
    cfg = Config()
    for name, value in settings.items():
        cfg.set(name, value)
    return cfg


def test_snapshot_keeps_every_setting_and_property_value():
    cfg = make_config(workers=3, keepalive=75, forwarded_allow_ips="127.0.0.1,::1")
    before = {name: getattr(cfg, name) for name in cfg.settings}
    properties = {name: getattr(cfg, name) for name in ("is_ssl", "address", "worker_class_str")}
    snapshot_config(cfg)
    assert isinstance(cfg, SnapshotConfig)
    assert {name: getattr(cfg, name) for name in cfg.settings} == before
    assert {name: getattr(cfg, name) for name in properties} == properties
    assert cfg.__dict__["keepalive"] == 75  # found without Config.__getattr__


def test_a_setting_changed_after_the_snapshot_reads_the_new_value():
    cfg = make_config(keepalive=75)
    snapshot_config(cfg)
    cfg.set("keepalive", 5)
    assert cfg.keepalive == 5


def test_a_config_of_another_kind_is_left_as_it_is():
    class Custom(Config):
        pass

    cfg = Custom()
    snapshot_config(cfg)
    assert type(cfg) is Custom
    assert "keepalive" not in cfg.__dict__


def test_memoized_allow_check_agrees_with_gunicorn():
    calls = []

    def check(ip, allow_list, networks):
        calls.append(ip)
        return GUNICORN_ALLOW_CHECK(ip, allow_list, networks)

    allowed = memoized_allow_check(check)
    loopback = ["127.0.0.1", "::1"]
    networks = [ipaddress.ip_network(a) for a in loopback]
    cases = [
        ("127.0.0.1", loopback, networks, True),
        ("::1", loopback, networks, True),
        ("127.0.0.7", loopback, networks, False),  # loopback, but not in the list
        ("not an address", loopback, networks, False),
        ("127.0.0.7", ["*"], [], True),
    ]
    for ip, allow_list, nets, expected in cases * 3:
        assert allowed(ip, allow_list, nets) is expected
    assert len(calls) == len(cases)  # each address and allow list asked once


def test_memoized_allow_check_asks_again_for_another_allow_list():
    allowed = memoized_allow_check(GUNICORN_ALLOW_CHECK)
    block = ipaddress.ip_network("127.0.0.0/8")
    assert allowed("127.0.0.7", ["127.0.0.1"], [ipaddress.ip_network("127.0.0.1")]) is False
    assert allowed("127.0.0.7", ["127.0.0.0/8"], [block]) is True


def test_reused_base_environ_builds_once_and_hands_out_copies():
    built = []

    def build(cfg):
        built.append(cfg)
        return GUNICORN_BASE_ENVIRON(cfg)

    base_environ = reused_base_environ(build)
    cfg = make_config(workers=2)
    first = base_environ(cfg)
    first["REQUEST_METHOD"] = "POST"  # default_environ fills each copy in
    second = base_environ(cfg)
    assert "REQUEST_METHOD" not in second
    assert second["wsgi.multiprocess"] is True
    assert len(built) == 1
    forget_base_environ()  # the log files were reopened
    base_environ(cfg)
    assert len(built) == 2


@pytest.fixture
def restore_gunicorn():
    saved = gunicorn_message._ip_in_allow_list, gunicorn_wsgi.base_environ
    yield
    gunicorn_message._ip_in_allow_list, gunicorn_wsgi.base_environ = saved
    forget_base_environ()


def test_apply_wraps_gunicorn_once(restore_gunicorn):
    cfg = make_config()
    gunicorn_speedups.apply(cfg)
    check, base = gunicorn_message._ip_in_allow_list, gunicorn_wsgi.base_environ
    gunicorn_speedups.apply(cfg)
    assert gunicorn_message._ip_in_allow_list is check
    assert gunicorn_wsgi.base_environ is base
    assert gunicorn_wsgi.base_environ(cfg) == GUNICORN_BASE_ENVIRON(cfg) | {
        "wsgi.errors": gunicorn_wsgi.base_environ(cfg)["wsgi.errors"]  # one wrapper, reused
    }
    loopback = [ipaddress.ip_network("127.0.0.1")]
    assert gunicorn_message._ip_in_allow_list("127.0.0.1", ["127.0.0.1"], loopback) is True
