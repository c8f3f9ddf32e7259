"""Who may call the web API, and who they are.

Keys: bearer API keys from EASELBOT_API_KEYS (comma-separated), compared as bytes in constant time.
Without keys the server only listens on loopback, answers only to a loopback Host (or [web] host),
against DNS rebinding, and refuses cross-site writes (an Origin that is not the server itself).

Identity: `GET /` gives each browser a random session cookie (HttpOnly, SameSite=Strict, and Secure
when the page was reached over HTTPS, directly or through a proxy's X-Forwarded-Proto). The user
is that session combined with the API key, if any: `k-<key MAC>.s-<session MAC>`, keyed with a random
secret kept in the store, so neither the key nor the cookie is ever stored, logged or published. A
client without the cookie is its key (`k-...`), or `local` without keys.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import urllib.parse

from aiohttp import web

from bot.adapters.web_input import JsonError
from bot.config import Config
from bot.store import JobStore

API_KEYS_ENV = "EASELBOT_API_KEYS"
SESSION_COOKIE = "easelbot_session"
_SESSION = re.compile(r"[A-Za-z0-9_-]{43}")
_SESSION_DAYS = 400
_SECRET_SETTING = "web:secret"
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def api_keys() -> list[str]:
    """The configured API keys (never logged)."""
    return [key.strip() for key in os.environ.get(API_KEYS_ENV, "").split(",") if key.strip()]


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1, localhost and names under .localhost."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def header_text(value: str) -> str:
    """Header text as real Unicode: bytes that were not UTF-8 become U+FFFD instead of lone surrogates."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def display_name(request: web.Request) -> str:
    """`X-Easelbot-Name`: percent-encoded UTF-8 (raw UTF-8 works too), printable, at most 40 characters."""
    name = urllib.parse.unquote(header_text(request.headers.get("X-Easelbot-Name", "")), errors="replace")
    return "".join(ch for ch in name if ch.isprintable()).strip()[:40]


class Access:
    """The key check, the Host and Origin checks without keys, and the user id of each request."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.keys = api_keys()
        self._secret = b""

    async def load(self, store: JobStore) -> None:
        """Read (or make and keep) the secret that user ids are MACs with."""
        stored = await store.get_setting(_SECRET_SETTING)
        if not isinstance(stored, str):
            stored = secrets.token_hex(32)
            await store.set_setting(_SECRET_SETTING, stored)
        self._secret = bytes.fromhex(stored)

    def check(self, request: web.Request, port: int | None) -> None:
        """JsonError unless this request may go on: a right key for the API, or without keys a local Host
        and no cross-site write."""
        if not self.keys:
            host = header_text(request.host)
            name = _host_name(host)
            if not (is_loopback(name) or name == self.config.web.host.lower()):
                raise JsonError(
                    421,
                    f"This server answers only to localhost or its own address, not to the host name `{host}`; "
                    f"open http://127.0.0.1:{port or self.config.web.port}/ or set {API_KEYS_ENV}.",
                )
            origin = header_text(request.headers.get("Origin", ""))
            cross = "Origin" in request.headers and urllib.parse.urlsplit(origin).netloc.lower() != host.lower()
            if cross and request.method not in _SAFE_METHODS:
                raise JsonError(403, f"Cross-site request refused: `Origin: {origin}` is not this server ({host}).")
        elif request.path.startswith("/api/") and request.path != "/api/v1/openapi.json":
            given = _given_key(request).encode("utf-8", "surrogateescape")
            if not any(hmac.compare_digest(given, key.encode()) for key in self.keys):
                raise JsonError(401, "Missing or wrong API key: send `Authorization: Bearer <key>`.")

    def user_id(self, request: web.Request) -> str:
        """`k-<MAC of the key>` and/or `s-<MAC of the session cookie>`, or `local`; never the secrets themselves."""
        parts = []
        if self.keys:
            parts.append("k-" + self._mac("key", _given_key(request))[:12])
        session = request.cookies.get(SESSION_COOKIE, "")
        if _SESSION.fullmatch(session):
            parts.append("s-" + self._mac("session", session)[:16])
        return ".".join(parts) or "local"

    def give_session(self, request: web.Request, response: web.Response) -> None:
        """Set a new session cookie unless the browser already has one."""
        if not _SESSION.fullmatch(request.cookies.get(SESSION_COOKIE, "")):
            response.set_cookie(
                SESSION_COOKIE,
                secrets.token_urlsafe(32),
                max_age=_SESSION_DAYS * 86400,
                path="/",
                httponly=True,
                samesite="Strict",
                secure=_over_https(request) or None,
            )

    def _mac(self, kind: str, value: str) -> str:
        if not self._secret:
            raise RuntimeError("the web adapter's secret is not loaded: the app has not started")
        message = f"{kind}:{value}".encode("utf-8", "surrogateescape")
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()


def _over_https(request: web.Request) -> bool:
    """The browser reached us over HTTPS: directly, or through a TLS-terminating proxy that says so with
    `X-Forwarded-Proto` (trusting it can only make the cookie stricter)."""
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return request.secure or forwarded == "https"


def _given_key(request: web.Request) -> str:
    """The bearer key of the Authorization header (`Bearer` in any case), else `?key=`."""
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.query.get("key", "")


def _host_name(host: str) -> str:
    """The name or address of a Host header value, without the port or IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, colon, port = host.rpartition(":")
    return name if colon and port.isdigit() and ":" not in name else host
