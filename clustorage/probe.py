"""A one-shot question to a loader (status, history) that does not join the cluster.

``clustorage status`` must cost the same on a 1 GB store as on an empty one (SPEC "Terminal"),
so it does not start a member node, which would resynchronise every value. A probe connects,
proves the cookie in the same handshake as any node, with the meta role ``"probe"``: the
loader then answers Status and History only, never counts it as a node (no Members broadcast,
not in ``status()["nodes"]``) and sends it nothing else. The probe asks, reads its answer and
closes.
"""

from __future__ import annotations

import itertools
import os
import socket
import ssl
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

from . import messages, tls
from .channel import raise_failure
from .config import (
    DEFAULT_TIMEOUT,
    LoaderAddress,
    generated_name,
    parse_loader,
    resolve_cookie,
    resolve_tls,
)
from .errors import AuthenticationError, ConfigError, LoaderUnavailable, ProtocolError
from .hello import check_welcome, handshake_meta
from .messages import FUNCTION, Entry, Failed, History, HistoryReply, Status, StatusReply
from .protocol import Closed, Connection, Frame, Role, State, Welcome

__all__ = ["PROBE_ROLE", "Probe"]

PROBE_ROLE = "probe"
_RECV = 1 << 16


class Probe:
    """A connection to a loader that asks questions without being a node.

    Args:
        loader: ``NAME[@HOST[:PORT]]`` (else ``$CLUSTORAGE_LOADER``).
        cookie, cookie_file: the cluster secret, as for :class:`clustorage.Node`.
        timeout: seconds to wait for the loader (else ``$CLUSTORAGE_TIMEOUT``, else 5).
        tls_cert, tls_key, tls_ca: TLS files, as for :class:`clustorage.Node`.

    Raises:
        ConfigError: no loader named, or the loader answers with another name.
        AuthenticationError: the loader does not accept our cookie.
        LoaderUnavailable: nothing answers at the loader's address.
    """

    def __init__(
        self,
        loader: str | LoaderAddress | None = None,
        *,
        cookie: str | bytes | None = None,
        cookie_file: str | os.PathLike[str] | None = None,
        timeout: float | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if env is None else env
        loader = loader or env.get("CLUSTORAGE_LOADER") or None
        if loader is None:
            raise ConfigError(
                "no loader named: use --loader NAME[@HOST[:PORT]] (or $CLUSTORAGE_LOADER)"
            )
        self.loader = parse_loader(loader) if isinstance(loader, str) else loader
        if timeout is None:
            try:
                timeout = float(env.get("CLUSTORAGE_TIMEOUT") or DEFAULT_TIMEOUT)
            except ValueError:
                raise ConfigError(
                    f"invalid timeout {env['CLUSTORAGE_TIMEOUT']!r}: use a number of seconds"
                ) from None
        if not timeout > 0:
            raise ConfigError(f"invalid timeout {timeout!r}: use a number of seconds above 0")
        self.timeout = timeout
        secret = resolve_cookie(cookie, cookie_file, env).secret
        cert, key, ca = resolve_tls(tls_cert, tls_key, tls_ca, env)
        self._context = tls.client_context(tls.TLSFiles(cert, key, ca)) if cert else None
        self._rids = itertools.count(1)
        self._sock = self._open()
        try:
            self._conn = self._handshake(secret)
        except BaseException:
            self._sock.close()
            raise

    def __repr__(self) -> str:
        return f"<clustorage Probe of {self.loader}>"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _open(self) -> socket.socket:
        where = (self.loader.host, self.loader.port)
        try:
            sock = socket.create_connection(where, timeout=self.timeout)
        except OSError as exc:
            raise LoaderUnavailable(
                f"cannot reach the loader {self.loader} ({exc.strerror or exc})"
            ) from exc
        if self._context is None:
            return sock
        try:
            return tls.connect(self._context, sock, self.loader.host, str(self.loader))
        except BaseException:
            sock.close()
            raise

    def _read(self, conn: Connection, deadline: float) -> None:
        """One read from the loader into ``conn``; raises LoaderUnavailable past ``deadline``."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LoaderUnavailable(f"no answer from the loader {self.loader} in {self.timeout:g}s")
        self._sock.settimeout(remaining)
        try:
            data = self._sock.recv(_RECV)
            if self._context is None and conn.state is State.AWAIT_CHALLENGE:
                tls.check_reply(data, str(self.loader))
            conn.receive_data(data)
        except ssl.SSLError as exc:
            raise tls.refusal(exc, str(self.loader)) from None
        except TimeoutError:
            raise LoaderUnavailable(
                f"no answer from the loader {self.loader} in {self.timeout:g}s"
            ) from None
        except OSError as exc:
            raise LoaderUnavailable(f"lost the loader {self.loader} ({exc})") from exc

    def _handshake(self, secret: bytes) -> Connection:
        name = f"probe-{generated_name()}"[:64]
        meta = handshake_meta(name, role=PROBE_ROLE, expect=self.loader.name)
        conn = Connection(Role.CLIENT, secret, meta, binding=tls.channel_binding(self._sock))
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                event = conn.next_event()
            except AuthenticationError as exc:
                raise AuthenticationError(
                    f"the loader {self.loader} refused our cookie; use the cluster's cookie "
                    f"(--cookie, --cookie-file, $CLUSTORAGE_COOKIE or ~/.clustorage/cookie)"
                ) from exc
            except ProtocolError as exc:
                raise LoaderUnavailable(f"the loader {self.loader}: {exc}") from exc
            self._sock.sendall(conn.data_to_send())
            if isinstance(event, Welcome):
                check_welcome(dict(event.meta), self.loader)
                return conn
            self._read(conn, deadline)

    def _ask(self, message: messages.Message, rid: int) -> messages.Message:
        conn = self._conn
        self._sock.sendall(conn.send_small(*messages.encode_parts(message)))
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                event = conn.next_event()
            except ProtocolError as exc:
                raise LoaderUnavailable(f"the loader {self.loader}: {exc}") from exc
            if isinstance(event, Closed):
                raise LoaderUnavailable(f"the loader {self.loader} closed the connection")
            if isinstance(event, Frame) and event.payload:
                reply = messages.decode(event.payload)
                if getattr(reply, "rid", None) == rid:
                    if type(reply) is Failed:
                        raise_failure(reply)
                    return reply
            elif event is None:
                self._read(conn, deadline)

    def status(self) -> dict[str, Any]:
        """The cluster as the loader sees it (``LoaderCore.status``): nodes, counts, leases."""
        rid = next(self._rids)
        reply = self._ask(Status(rid), rid)
        assert type(reply) is StatusReply
        return reply.status

    def history(self, key: str, kind: str = FUNCTION) -> list[Entry]:
        """Every stored version of a function (or value), oldest first."""
        rid = next(self._rids)
        reply = self._ask(History(rid, kind, key), rid)
        assert type(reply) is HistoryReply
        return list(reply.entries)

    def close(self) -> None:
        """Close the connection (the loader forgets the probe). Safe to call twice."""
        self._sock.close()
