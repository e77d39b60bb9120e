"""gunicorn settings for the bare relay: the same server settings as the gateway's."""

import os

bind = os.environ.get("GATEWAY_BIND", "127.0.0.1:8082")
workers = int(os.environ.get("GATEWAY_WORKERS", "1"))
worker_class = "gevent"
worker_connections = int(os.environ.get("GATEWAY_WORKER_CONNECTIONS", "1000"))
keepalive = 75
accesslog = None
errorlog = "-"
control_socket_disable = True
