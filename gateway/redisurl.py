"""`redis_url` parsed into what to connect to: one server, a Sentinel-managed primary, or a Cluster.

Pure parsing (no redis import), so `config` can refuse a malformed URL at load time and name what is wrong:
- `redis://`, `rediss://`, `unix://`: one server, in redis-py's own URL syntax (its query options included);
- `redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]`: the sentinels to ask for the
  primary of SERVICE (USER and PASSWORD are the data nodes'); `rediss+sentinel://` speaks TLS to the data nodes;
- `redis+cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]`: Cluster seed nodes; `rediss+cluster://` for TLS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["RedisTarget", "parse"]

Mode = Literal["single", "sentinel", "cluster"]

_SCHEMES: dict[str, tuple[Mode, bool]] = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "unix": ("single", False),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
# TLS files for the data nodes of a Sentinel or Cluster URL (a single server's URL takes all of redis-py's options).
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


@dataclass(frozen=True, slots=True)
class RedisTarget:
    mode: Mode
    url: str = field(repr=False)
    tls: bool = False
    # Sentinels for "sentinel", seed nodes for "cluster", the server for "single" (none for a Unix socket).
    nodes: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    options: tuple[tuple[str, str], ...] = ()

    def where(self) -> str:
        """Where Redis is, for logs: host names and ports, never a password."""
        hosts = ",".join(f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in self.nodes)
        if self.mode == "sentinel":
            return f"sentinels {hosts} (service {self.service!r})"
        if self.mode == "cluster":
            return f"cluster {hosts}"
        if not self.nodes:
            return f"unix socket {urlsplit(self.url).path}"
        return hosts


def parse(url: str) -> RedisTarget:
    """Parse `redis_url`; ValueError says what is wrong (never echoing a password)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("is not a URL") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(
            "must be a redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://, redis+cluster:// "
            "or rediss+cluster:// URL"
        )
    mode, tls = _SCHEMES[scheme]
    if parts.fragment:
        raise ValueError("must not have a #fragment")
    if mode == "single":
        return _single(url, parts.path, parts.netloc, scheme, tls)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, password = _credentials(userinfo)
    nodes = tuple(_node(text) for text in hosts.split(","))
    options = parse_qsl(parts.query, keep_blank_values=True)
    for name, _value in options:
        if name not in _TLS_OPTIONS:
            raise ValueError(f"has an unknown query option {name!r} (allowed: {', '.join(_TLS_OPTIONS)})")
    if options and not tls:
        raise ValueError(f"has TLS options but is not a {scheme.replace('redis', 'rediss', 1)}:// URL")
    segments = [unquote(s) for s in parts.path.split("/")[1:]] if parts.path else []
    if mode == "sentinel":
        if not segments or not segments[0]:
            raise ValueError("must name the Sentinel service: redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]")
        if len(segments) > 2 or (len(segments) == 2 and not segments[1].isdigit()):
            raise ValueError("must end in /SERVICE or /SERVICE/DB (DB a number)")
        service, db = segments[0], int(segments[1]) if len(segments) == 2 else 0
    else:
        if [s for s in segments if s] not in ([], ["0"]):
            raise ValueError("must have no path: a Cluster has one database (0)")
        service, db = None, 0
    return RedisTarget(
        mode=mode,
        url=url,
        tls=tls,
        nodes=nodes,
        service=service,
        db=db,
        username=username,
        password=password,
        options=tuple(options),
    )


def _single(url: str, path: str, netloc: str, scheme: str, tls: bool) -> RedisTarget:
    if scheme == "unix":
        if not path:
            raise ValueError("must name the socket: unix:///PATH/TO/redis.sock")
        return RedisTarget(mode="single", url=url)
    if "," in netloc:
        raise ValueError("names several hosts: use redis+sentinel:// or redis+cluster:// for more than one server")
    host = netloc.rpartition("@")[2]
    bare = host.rpartition("]")[2] if host.startswith("[") else host
    node = _node(host) if ":" in bare else (host.strip("[]"), 6379)
    if not node[0]:
        raise ValueError("must name a host: redis://HOST[:PORT][/DB]")
    db = path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"has a database {db!r} that is not a number")
    return RedisTarget(mode="single", url=url, tls=tls, nodes=(node,), db=int(db or 0))


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    if not userinfo:
        return None, None
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)


def _node(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":") if bracket and rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":")
    if not host or not port_text:
        raise ValueError(f"has a node {text!r} that is not HOST:PORT")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"has a node {text!r} whose port is not a number from 1 to 65535")
    return host, int(port_text)
