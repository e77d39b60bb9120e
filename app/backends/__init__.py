"""The backend side: the HTTP session and its per-backend adapters, each backend's client,
routing a model name to a route, per-worker backend health, and dispatching one client request
to a route's targets with retries and failover."""
