"""The access line as a worker's logging writes it, and the request id it keeps
(app/ops/access_log.py); what a request's line holds: tests/integration/test_observability.py."""

from __future__ import annotations

import json
import logging
import re

import pytest

from app.ops import access_log as observability


@pytest.fixture
def gateway_logger(tmp_path):
    """The gateway's logging as a worker configures it, with its stderr handler writing to a
    file instead; the previous logging state comes back afterwards."""
    logger = logging.getLogger("gateway")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    observability.configure_logging("info")
    sink = open(tmp_path / "stderr", "w")  # noqa: SIM115 - closed below
    logger.handlers[0].setStream(sink)
    yield logger, tmp_path / "stderr"
    sink.close()
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.setLevel(saved[0])
    for handler in saved[1]:
        logger.addHandler(handler)
    logger.propagate = saved[2]


def test_access_line_is_written_whole_to_the_gateway_handler(gateway_logger):
    logger, path = gateway_logger
    observability.log_access({"request_id": "req_x", "status": 200, "path": "/v1/messages"}, 0.0)
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["request_id"] == "req_x" and entry["status"] == 200 and "duration_ms" in entry


def test_access_lines_are_off_below_info(gateway_logger):
    logger, path = gateway_logger
    logger.setLevel("WARNING")
    observability.log_access({"request_id": "req_y", "status": 200}, 0.0)
    assert path.read_text() == ""


def test_another_handler_on_the_way_gets_ordinary_log_records(gateway_logger):
    logger, path = gateway_logger
    seen: list[logging.LogRecord] = []
    extra = logging.Handler()
    extra.emit = seen.append
    logger.addHandler(extra)
    try:
        observability.log_access({"request_id": "req_z", "status": 200}, 0.0)
    finally:
        logger.removeHandler(extra)
    assert [r.msg["request_id"] for r in seen] == ["req_z"]
    assert json.loads(path.read_text())["request_id"] == "req_z"  # and still one line


@pytest.mark.parametrize(
    ("header", "kept"),
    [
        ("nginx-0123456789abcdef", True),
        ("abcdefgh\n", False),  # it goes into the backend request's head as it is
        ("abcdefgh\r\nX-Evil: 1", False),
        ("short", False),
        ("x" * 129, False),
        (None, False),
    ],
)
def test_only_a_sane_incoming_request_id_is_kept(header, kept):
    request_id = observability.request_id_from(header)
    assert (request_id == header) is kept
    assert re.fullmatch(r"[A-Za-z0-9._:-]{8,128}", request_id)
