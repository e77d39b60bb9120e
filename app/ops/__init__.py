"""What operators read: the JSON access log, Prometheus metrics and readiness."""
