"""gunicorn settings for the gateway, read from the environment with safe defaults.

Nothing from the app or urllib3 is imported at module level: this file runs in the
gunicorn master, which gevent never patches, and the workers must be the first to import the
network stack (after monkey-patching). ``app.config`` is the exception: it uses the standard
library only, and loading it here makes a bad config stop the service at start with one line;
so does ``app.state.open.prepare`` (the standard library's sqlite3), which makes the state
directory and its schema before any worker needs them.
"""

import glob
import os
import sys
import tempfile

from app.config import (
    WORKER_CONNECTIONS,
    has_last_good,
    load_settings_or_last_good,
    validate_for_master,
)
from app.state.open import prepare


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        sys.exit(f"gateway: {name} must be an integer (got {value!r})")


# Evaluated at start and again on every reload (HUP). At start a bad config stops gunicorn;
# on a reload the running service keeps its last good config rather than losing its workers.
# The master keeps that config in its memory (app/config/last_good.py), never in the
# environment: a binary upgrade (USR2) starts afresh and must fail on a bad config too.
_first_start = not has_last_good()
# Set by earlier versions, with the whole config, secrets included; not passed on to children.
os.environ.pop("GATEWAY_LAST_GOOD_CONFIG", None)
_problem = validate_for_master(os.environ)
if _problem and _first_start:
    sys.exit(f"gateway: bad configuration: {_problem}")
if _problem:
    print(f"gateway: bad configuration, keeping the last good one: {_problem}", file=sys.stderr)

# What the workers will run with: the new config, or on a bad reload the last good one.
_settings = load_settings_or_last_good(os.environ)

# A state directory the service cannot write would leave every limit open: stop at start.
if _first_start and not _problem:
    _state_problem = prepare(_settings.state)
    if _state_problem:
        sys.exit(f"gateway: {_state_problem}")

# Prometheus multiprocess mode: every worker writes its samples under this directory, and a
# scrape of any worker merges them. Emptied at start (not on reload: live workers use it).
if _first_start:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gateway-metrics-")
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    for _stale in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
        os.remove(_stale)

# Loopback by default; nginx in front terminates TLS. Never 0.0.0.0 on a shared host.
bind = os.environ.get("GATEWAY_BIND", "127.0.0.1:8082").split(",")
workers = _env_int("GATEWAY_WORKERS", 2)
# gunicorn's gevent worker, with the garbage collector tuned (app/serving/worker.py).
worker_class = "app.serving.worker.GatewayWorker"
# Open streams and idle keep-alive connections each hold one slot per worker.
worker_connections = _env_int("GATEWAY_WORKER_CONNECTIONS", WORKER_CONNECTIONS)
os.environ.setdefault("GATEWAY_WORKER_CONNECTIONS", str(worker_connections))
# A heartbeat watchdog, not a request limit: it fires only if a worker blocks its event loop.
timeout = 30
# How long in-flight streams may drain on stop/reload before they are cut.
graceful_timeout = _env_int("GATEWAY_GRACEFUL_TIMEOUT", 120)
# Longer than nginx's upstream keepalive_timeout (60 s), so nginx never reuses a closed socket.
keepalive = _env_int("GATEWAY_KEEPALIVE", 75)
# The app is imported in each worker, after gevent patched it; see the module docstring.
preload_app = False
# Heartbeat files on tmpfs where available: a disk-backed heartbeat can stall the worker.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
accesslog = None  # the gateway writes its own JSON access line per request
errorlog = "-"
loglevel = _settings.log_level  # the TOML log_level or GATEWAY_LOG_LEVEL, as the app reads it
forwarded_allow_ips = "127.0.0.1,::1"
proc_name = "anthropic-gateway"
# gunicorn's control socket defaults to a path in $HOME shared by every instance on the host;
# enable it only with an explicit per-instance path.
control_socket = os.environ.get("GATEWAY_CONTROL_SOCKET", "") or None
control_socket_disable = control_socket is None


def worker_exit(server, worker):
    """On a worker's way out: its batch items back to the queue, the usage records it has not
    written yet (app/state/buffer.py), and the trace spans it has not sent (app/ops/tracing.py,
    for a few seconds at most)."""
    from app.ops import tracing
    from app.state.buffer import flush_all

    runner = getattr(worker, "wsgi", None) and worker.wsgi.extensions.get("gateway.batch_runner")
    if runner is not None:
        runner.stop()
    try:
        flush_all()
    finally:
        tracing.stop()


def post_worker_init(worker):
    """In each worker, after gevent patched it: end streams cleanly when the drain time is up,
    start its batch runner (app/batches/runner.py), and start OpenTelemetry tracing if the
    OTEL_* variables ask for it (its batch thread must be a greenlet, and must not exist in the
    master: app/ops/tracing.py)."""
    from app.ops import tracing
    from app.serving import lifecycle

    lifecycle.install(worker)
    tracing.start()
    runner = worker.wsgi.extensions.get("gateway.batch_runner")
    if runner is not None:
        runner.start()


def child_exit(server, worker):
    """A worker is gone: drop its live gauges from the metrics (what prometheus_client's
    ``mark_process_dead`` does; done by hand to keep its ssl import out of the master)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        for path in glob.glob(os.path.join(directory, f"gauge_live*_{worker.pid}.db")):
            os.remove(path)
