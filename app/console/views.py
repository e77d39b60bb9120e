"""The console's routes. Every route but the sign-in page and the static files needs a live
session (``_gate``, run before each view); every POST also its CSRF token and this origin.
Pages are Jinja templates (autoescaped: key names are user input), styled and scripted from
files under /admin/static only, so the Content-Security-Policy allows no inline code."""

from __future__ import annotations

import calendar
import functools
import mimetypes
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import (
    Blueprint,
    Response,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from werkzeug.security import safe_join
from werkzeug.wrappers import Response as BaseResponse

from app import jsonc
from app.backends.dispatch import Dispatcher
from app.batches.service import Batches
from app.config import LIMIT_FIELDS, ConfigError, Settings
from app.console import keyring, live
from app.console.batches_page import add_batch_routes
from app.console.guard import same_origin, secure
from app.console.sessions import COOKIE, PATH, Sessions, csrf_ok, csrf_token, who
from app.errors import GatewayError
from app.keys import KeysFileError, add_key, change_key, revoke_key
from app.policy.limits import KeyPolicy
from app.policy.usage import GROUPS, BadPeriod, comma_separated, period, summed, total
from app.serving.state import Phase, current
from app.state.buffer import FAILURES
from app.state.guard import GuardedStore

PUBLIC = frozenset({"console.sign_in", "console.static"})


def create_console_blueprint(
    settings: Settings,
    dispatcher: Dispatcher,
    keys: Mapping[bytes, KeyPolicy],
    store: GuardedStore,
    batches: Batches | None = None,
) -> Blueprint:
    bp = Blueprint(
        "console",
        __name__,
        url_prefix="/admin",
        template_folder="templates",
    )
    sessions = Sessions(store, settings.admin_token)

    @bp.before_request
    def _gate() -> BaseResponse | None:
        if not settings.admin_token:
            return _plain("Not found: the console is off (no admin token is configured).", 404)
        if request.endpoint == "console.static":
            return None  # the same files for everyone: no session to look up
        session_id = request.cookies.get(COOKIE)
        try:
            g.console_session = session_id if sessions.live(session_id) else None
        except GatewayError:
            return _plain("The state store is unavailable; try again shortly.", 503)
        if request.endpoint in PUBLIC:
            return None
        if g.console_session is None:
            # A page opens the sign-in page; a partial fetched by htmx (which would put the
            # sign-in page in its place) and any POST get a refusal.
            if request.method == "GET" and "HX-Request" not in request.headers:
                return secure(redirect(url_for("console.sign_in")), private=True)
            return _plain("Forbidden: sign in first.", 403)
        if request.method == "POST":
            _body_read()
            offered = request.form.get("csrf", "")
            if not same_origin(request) or not csrf_ok(g.console_session, offered):
                return _plain("Forbidden: this form did not come from this console.", 403)
        return None

    @bp.app_template_filter("console_time")
    def _time(moment: int) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(moment))

    @bp.app_template_filter("console_day")
    def _day(moment: int) -> str:
        return time.strftime("%Y-%m-%d", time.gmtime(moment))

    @bp.after_request
    def _headers(response: BaseResponse) -> BaseResponse:
        return secure(response, private=request.endpoint != "console.static")

    @bp.context_processor
    def _context() -> dict[str, Any]:
        session_id = g.get("console_session")
        return {
            "csrf": csrf_token(session_id) if session_id else "",
            "signed_in": session_id,
            "batches_on": batches is not None,
        }

    @bp.get("/static/<path:filename>")
    def static(filename: str) -> BaseResponse:
        """The console's script, styles and vendored libraries, read once into memory and
        written as one body (Flask's ``send_file`` hands the file to the server's sendfile,
        which under this worker answered without a status line)."""
        found = _static_file(filename)
        if found is None:
            return _plain("Not found.", 404)
        data, mimetype = found
        return Response(data, mimetype=mimetype, headers={"Cache-Control": "max-age=3600"})

    @bp.route("/sign-in", methods=["GET", "POST"])
    def sign_in() -> BaseResponse | str:
        if request.method == "GET":
            if g.console_session:
                return redirect(url_for("console.overview"))
            return render_template("console/sign_in.html")
        _body_read()
        if not same_origin(request):
            return _plain("Forbidden: this form did not come from this console.", 403)
        address = request.remote_addr or "-"
        if not sessions.may_try(address):
            page = render_template(
                "console/sign_in.html", error="Too many attempts; wait a minute."
            )
            return Response(page, status=429, headers={"Retry-After": "60"})
        session_id = sessions.sign_in(request.form.get("token", ""), address)
        if session_id is None:
            page = render_template("console/sign_in.html", error="That is not the admin token.")
            return Response(page, status=401)
        response = redirect(url_for("console.overview"), code=303)
        response.set_cookie(
            COOKIE,
            session_id,
            path=PATH,
            httponly=True,
            secure=request.is_secure,
            samesite="Strict",
        )
        return response

    @bp.post("/sign-out")
    def sign_out() -> BaseResponse:
        sessions.end(g.console_session)
        response = redirect(url_for("console.sign_in"), code=303)
        response.delete_cookie(COOKIE, path=PATH, httponly=True, samesite="Strict")
        return response

    @bp.get("/")
    def overview() -> str:
        chosen = request.args.get("range", "day")
        if chosen not in live.RANGES:
            chosen = "day"
        now = time.time()
        try:
            columns = live.series(store, chosen, now)
        except GatewayError:
            columns = None
        return render_template(
            "console/overview.html",
            page="overview",
            ranges=list(live.RANGES),
            chosen=chosen,
            series=columns,
            totals=live.totals(columns) if columns else None,
            backends=live.backends(dispatcher, store),
        )

    @bp.get("/live")
    def live_tiles() -> str:
        """The Overview's backends table, fetched again every few seconds (htmx)."""
        return render_template("console/_backends.html", backends=live.backends(dispatcher, store))

    @bp.get("/keys")
    def keys_page() -> str:
        return _keys_page(settings, store)

    @bp.post("/keys")
    def create_key() -> BaseResponse | str:
        name = request.form.get("name", "").strip()
        try:
            _need_keys_file(settings)
            limits = keyring.limits_from(request.form)
            expires = keyring.expiry_from(request.form)
            key = add_key(settings.keys_file, name, expires, limits)
        except (KeysFileError, ConfigError, OSError) as exc:
            return Response(_keys_page(settings, store, error=_message(exc)), status=400)
        details = {"limits": limits, "expires": expires}
        keyring.audit(store, who(g.console_session), "create", name, details)
        keyring.reload_workers(request.environ)
        return _keys_page(settings, store, created=(name, key))

    @bp.post("/keys/revoke")
    def revoke() -> BaseResponse | str:
        name = request.form.get("name", "")
        try:
            _need_keys_file(settings)
            revoke_key(settings.keys_file, name)
        except (KeysFileError, OSError) as exc:
            return Response(_keys_page(settings, store, error=_message(exc)), status=400)
        keyring.audit(store, who(g.console_session), "revoke", name, {})
        keyring.reload_workers(request.environ)
        return redirect(url_for("console.keys_page"), code=303)

    @bp.post("/keys/change")
    def change() -> BaseResponse | str:
        name = request.form.get("name", "")
        try:
            _need_keys_file(settings)
            limits = keyring.limits_from(request.form)
            expires = keyring.expiry_from(request.form)
            change_key(settings.keys_file, name, expires, limits)
        except (KeysFileError, ConfigError, OSError) as exc:
            return Response(_keys_page(settings, store, error=_message(exc)), status=400)
        details = {"limits": limits, "expires": expires}
        keyring.audit(store, who(g.console_session), "change", name, details)
        keyring.reload_workers(request.environ)
        return redirect(url_for("console.keys_page"), code=303)

    @bp.get("/report")
    def report() -> BaseResponse | str:
        """Usage by key, model and day: the numbers ``python -m app.usage`` prints."""
        try:
            since, until, by, rows = _usage_query(store)
        except BadPeriod as exc:
            return Response(render_template("console/report.html", error=str(exc)), status=400)
        days = summed(rows, ["day"])
        chart = {
            "t": [_epoch(str(entry["day"])) for entry in days],
            **{field: [entry[field] for entry in days] for field in live.SERIES},
        }
        return render_template(
            "console/report.html",
            page="report",
            since=since,
            until=until,
            by=by,
            groups=GROUPS,
            entries=summed(rows, by),
            total=total(rows),
            chart=chart,
            key=request.args.get("key", ""),
            model=request.args.get("model", ""),
            query=request.query_string.decode("ascii", "replace"),
        )

    @bp.get("/report.csv")
    def report_csv() -> BaseResponse:
        try:
            since, until, by, rows = _usage_query(store)
        except BadPeriod as exc:
            return _plain(str(exc), 400)
        return Response(
            comma_separated(summed(rows, by), by),
            mimetype="text/csv",
            headers={"Content-Disposition": f'attachment; filename="usage-{since}-{until}.csv"'},
        )

    @bp.get("/errors")
    def errors() -> str:
        try:
            entries = [jsonc.loads(entry) for entry in store.read_log(FAILURES, 200)]
        except GatewayError:
            entries = []
        return render_template("console/errors.html", page="errors", entries=entries)

    if batches is not None:
        add_batch_routes(bp, batches)
    return bp


STATIC = Path(__file__).parent / "static"


@functools.lru_cache(maxsize=64)  # a few files; any other name is a 404
def _static_file(filename: str) -> tuple[bytes, str] | None:
    path = safe_join(str(STATIC), filename)
    if path is None or not os.path.isfile(path):
        return None
    with open(path, "rb") as fh:
        data = fh.read()
    return data, mimetypes.guess_type(path)[0] or "application/octet-stream"


def _keys_page(
    settings: Settings,
    store: GuardedStore,
    error: str = "",
    created: tuple[str, str] | None = None,
) -> str:
    rows, problem = keyring.key_rows(settings, store, time.time())
    return render_template(
        "console/keys.html",
        page="keys",
        rows=rows,
        fields=LIMIT_FIELDS,
        problem=problem,
        error=error,
        created=created,
        editable=bool(settings.keys_file),
        audit=keyring.audit_entries(store),
    )


def _usage_query(store: GuardedStore) -> tuple[str, str, list[str], list[Any]]:
    args = request.args
    since, until = period(args.get("since") or None, args.get("until") or None, time.time())
    by = [name for name in args.getlist("by") if name in GROUPS] or ["key", "model"]
    rows = store.usage(since, until, args.get("key") or None, args.get("model") or None)
    return since, until, by, rows


def _need_keys_file(settings: Settings) -> None:
    if not settings.keys_file:
        raise KeysFileError("no keys file: set [auth] keys_file in the configuration")


def _message(exc: Exception) -> str:
    """A refusal as the operator reads it: the keys file's and the config's own words, or why
    the file could not be written (under the systemd unit, /etc is read-only to the service:
    a keys file the console manages belongs in the state directory)."""
    if isinstance(exc, OSError):
        return f"cannot write the keys file: {exc.strerror or exc} ({exc.filename or ''})"
    return str(exc)


def _epoch(day: str) -> float:
    return float(calendar.timegm(time.strptime(day, "%Y-%m-%d")))


def _body_read() -> None:
    """The form is read: the answer may keep the connection (app/serving/web.py closes it
    after a request whose body was left unread)."""
    state = current()
    if state is not None:
        state.advance(Phase.BODY_READ)


def _plain(text: str, status: int) -> BaseResponse:
    return secure(Response(text + "\n", status=status, mimetype="text/plain"), private=True)
