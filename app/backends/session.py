"""The worker's one ``requests.Session``, and an ``HTTPAdapter`` mounted on it per backend.

requests keeps policy (the Session: defaults, proxies, cookies, hooks, redirects) apart from
transport (the adapter: connection pools, TLS, timeouts). The gateway needs none of the
session's policy: it posts JSON to backends it was configured with, follows no redirect, keeps
no cookie, and decides about retries itself. So each backend gets an adapter of its own, and
every call goes to that adapter's public ``send`` with settings fixed at start:

- the pool holds as many connections as the worker can have requests in flight, and never
  blocks (the balancer caps concurrency per backend);
- urllib3 retries nothing (``app.backends.dispatch`` owns retries and failover); its
  connections tell the keep-alive race apart (``KeptAliveConnection``), for the backend client
  to send such a request once more;
- proxies come from the config or, with ``trust_env``, from the environment, read once here
  instead of on every call as ``Session.request`` does;
- TLS is verified, against the backend's ``ca_bundle`` if it names one, with its optional
  client certificate.

Measured in a gevent-patched process against a local backend, one small POST cost 577 µs of
CPU through ``Session.post``, 449 µs with ``trust_env`` off, 259 µs through this adapter's
``send`` and 204 µs in urllib3's ``urlopen`` alone: the session layer was half the cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from requests.models import PreparedRequest
from requests.structures import CaseInsensitiveDict
from requests.utils import get_environ_proxies
from urllib3 import BaseHTTPResponse, PoolManager, ProxyManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import ConnectionPool, HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util import Retry, Timeout

from app.config import Upstream

# urllib3 tries nothing twice and follows nothing: a failed attempt reaches the dispatcher,
# which knows whether the backend ever saw the request.
NO_RETRIES = Retry(total=0, read=False, redirect=False, raise_on_redirect=False)


class ClosedWhileIdle(ConnectionError):
    """The backend closed a kept-alive connection as a request went out on it."""


class KeptAliveConnection:
    """A connection that knows whether it was reused, to tell the keep-alive race apart.

    A server closes an idle connection when its keep-alive timeout runs out (5 s in
    llama.cpp's httplib and in uvicorn, which serves vLLM). urllib3 replaces a pooled
    connection whose close has already arrived, but when the close crosses the request on the
    wire, the request meets a closed socket and the answer is no answer at all. That happened
    once in a test run against llama.cpp; with ``retries = 0``, or one backend, it was a 502.
    The server never read the request (RFC 9112, section 9.3.1), so sending it again on a new
    connection is safe, and is what HTTP clients do for requests they may repeat: a completion
    has no side effect. A connection closed without an answer to its *first* request is
    another matter (a backend that crashed, or refuses): that is left to the dispatcher.
    """

    requests_sent = 0

    def request(self, *args: Any, **kwargs: Any) -> None:
        self.requests_sent += 1
        super().request(*args, **kwargs)  # type: ignore[misc]

    def getresponse(self) -> Any:
        try:
            return super().getresponse()  # type: ignore[misc]
        except ConnectionResetError as exc:  # http.client.RemoteDisconnected is one
            if self.requests_sent < 2:
                raise
            raise ClosedWhileIdle(f"a kept-alive connection was closed: {exc}") from exc


class KeptAliveHTTPConnection(KeptAliveConnection, HTTPConnection):
    pass


class KeptAliveHTTPSConnection(KeptAliveConnection, HTTPSConnection):
    pass


class BackendHTTPPool(HTTPConnectionPool):
    ConnectionCls = KeptAliveHTTPConnection


class BackendHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = KeptAliveHTTPSConnection


POOL_CLASSES: dict[str, type[HTTPConnectionPool]] = {
    "http": BackendHTTPPool,
    "https": BackendHTTPSPool,
}


class BackendAdapter(HTTPAdapter):
    """The transport to one backend. ``init_poolmanager`` and ``proxy_manager_for`` give its
    pools connections that know when they were reused (``KeptAliveConnection``). Three more
    of HTTPAdapter's documented extension points are overridden, each to drop work a backend
    answer does not need:

    - ``build_response`` keeps urllib3's (already case-insensitive) header mapping as it is
      and collects no cookies: the gateway keeps none, and copying the headers into
      requests' own mapping and running the cookie jar over them cost about 20 µs a call;
    - ``get_connection_with_tls_context`` finds the backend's connection pool once per
      origin rather than building urllib3's pool key on every call: the adapter serves one
      backend, whose TLS settings and proxy are fixed;
    - ``request_url`` (the target in the request line) is worked out once per URL, not
      parsed again on every call.
    """

    def __init__(self, pool_size: int) -> None:
        self.pools: dict[tuple[str, str, str], ConnectionPool] = {}
        self.targets: dict[tuple[str, bool], str] = {}
        super().__init__(
            pool_connections=4, pool_maxsize=pool_size, max_retries=NO_RETRIES, pool_block=False
        )

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = POOL_CLASSES

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> PoolManager:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if type(manager) is ProxyManager:  # a SOCKS proxy's pools make connections of their own
            manager.pool_classes_by_scheme = POOL_CLASSES
        return manager

    def get_connection_with_tls_context(
        self,
        request: PreparedRequest,
        verify: bool | str | None,
        proxies: Mapping[str, str] | None = None,
        cert: tuple[str, str] | str | None = None,
    ) -> ConnectionPool:
        url = request.url or ""
        scheme, _, rest = url.partition("://")
        key = (scheme, rest.partition("/")[0], str(verify))
        pool = self.pools.get(key)
        if pool is None:
            pool = super().get_connection_with_tls_context(request, verify, proxies, cert)
            self.pools[key] = pool
        return pool

    def request_url(self, request: PreparedRequest, proxies: Mapping[str, str] | None) -> str:
        key = (request.url or "", bool(proxies))
        target = self.targets.get(key)
        if target is None:
            target = self.targets[key] = super().request_url(request, proxies)
        return target

    def build_response(self, req: PreparedRequest, resp: BaseHTTPResponse) -> requests.Response:
        response = requests.Response()
        response.status_code = resp.status
        # urllib3's HTTPHeaderDict, as case-insensitive as the CaseInsensitiveDict the stub
        # names: keeping it is the point of this override.
        response.headers = resp.headers  # type: ignore[assignment]
        response.raw = resp
        response.reason = resp.reason or ""
        response.url = req.url or ""
        response.request = req
        response.connection = self
        return response

    def close(self) -> None:
        self.pools.clear()
        self.targets.clear()
        super().close()


class Transport:
    """How the worker's session reaches one backend: its adapter, and the TLS and proxy
    settings every call to it passes, fixed at start."""

    def __init__(self, session: requests.Session, config: Upstream, pool_size: int) -> None:
        self.adapter = BackendAdapter(pool_size)
        session.mount(config.url + "/", self.adapter)
        self.verify: bool | str = config.ca_bundle or True
        self.cert: tuple[str, str] | str | None = None
        if config.client_cert:
            self.cert = (
                (config.client_cert, config.client_key) if config.client_key else config.client_cert
            )
        self.proxies = proxies_for(config)
        self.connect_timeout = config.timeouts.connect
        self.timeouts: dict[float, Timeout] = {}

    def prepare(self, url: str, headers: Mapping[str, str], method: str = "POST") -> Template:
        return Template(method, url, headers)

    def send(
        self, request: PreparedRequest, *, stream: bool, read_timeout: float
    ) -> requests.Response:
        """Send through the adapter; raises requests' exceptions (and urllib3's ValueError
        family for a malformed request), which app.backends.client maps to gateway errors."""
        timeout = self.timeouts.get(read_timeout)
        if timeout is None:
            timeout = Timeout(connect=self.connect_timeout, read=read_timeout)
            self.timeouts[read_timeout] = timeout
        return self.adapter.send(
            request,
            stream=stream,
            # requests documents a urllib3 Timeout here (it is passed through as it is, where
            # a tuple is converted on every call); its stub lists only floats and tuples.
            timeout=timeout,  # type: ignore[arg-type]
            verify=self.verify,
            cert=self.cert,
            proxies=self.proxies,
        )


class Template:
    """A request prepared once (method, URL, the headers every call carries): each call
    copies it and sets only its body and its own headers, instead of preparing the URL and
    headers again (requests' ``prepare`` parses and re-quotes the URL every time)."""

    __slots__ = ("method", "url", "headers")

    def __init__(self, method: str, url: str, headers: Mapping[str, str]) -> None:
        prepared = requests.Request(method, url, headers=dict(headers)).prepare()
        self.method = prepared.method
        self.url = prepared.url
        self.headers = prepared.headers

    def request(
        self, body: bytes | None, headers: Mapping[str, str] | None = None
    ) -> PreparedRequest:
        prepared = PreparedRequest()
        prepared.method = self.method
        prepared.url = self.url
        prepared.headers = CaseInsensitiveDict(self.headers)
        if headers:
            prepared.headers.update(headers)
        if body is not None:
            prepared.body = body
            prepared.headers["Content-Length"] = str(len(body))
        return prepared


def proxies_for(config: Upstream) -> dict[str, str]:
    """The proxy for the backend's URL: ``proxy`` from the config, or with ``trust_env``
    the environment's ``HTTP(S)_PROXY`` and ``NO_PROXY``, as curl would read them."""
    scheme = config.url.partition("://")[0]
    if config.proxy:
        return {scheme: config.proxy}
    if config.trust_env:
        found = get_environ_proxies(config.url)
        proxy = found.get(scheme) or found.get("all")
        return {scheme: proxy} if proxy else {}
    return {}


def new_session() -> requests.Session:
    """The worker's session: nothing from the environment (``trust_env`` off; proxies are
    resolved once per backend by ``proxies_for``), no redirects."""
    session = requests.Session()
    session.trust_env = False
    session.max_redirects = 0
    return session
