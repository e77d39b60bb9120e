"""The operator console at ``/admin/``: server-rendered pages on the state the gateway already
keeps (app/console/views.py), off unless an admin token is configured."""

from app.console.views import create_console_blueprint

__all__ = ["create_console_blueprint"]
