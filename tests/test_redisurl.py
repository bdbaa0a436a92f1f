"""gateway/redisurl.parse: what each kind of redis_url becomes, and what logs may say of it."""

from __future__ import annotations

import pytest

from gateway.redisurl import RedisTarget, parse


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis://10.0.0.5:6380/2",
            RedisTarget(mode="single", url="redis://10.0.0.5:6380/2", nodes=(("10.0.0.5", 6380),), db=2),
        ),
        ("rediss://redis.internal", RedisTarget(mode="single", url="", tls=True, nodes=(("redis.internal", 6379),))),
        ("unix:///run/redis.sock?db=1", RedisTarget(mode="single", url="")),
        (
            "redis+sentinel://app:p%40ss@s1:26379,[::1]:26380/mymaster/3",
            RedisTarget(
                mode="sentinel",
                url="",
                nodes=(("s1", 26379), ("::1", 26380)),
                service="mymaster",
                db=3,
                username="app",
                password="p@ss",
            ),
        ),
        (
            "rediss+cluster://:secret@n1:7000,n2:7001?ssl_ca_certs=/etc/ca.pem",
            RedisTarget(
                mode="cluster",
                url="",
                tls=True,
                nodes=(("n1", 7000), ("n2", 7001)),
                password="secret",
                options=(("ssl_ca_certs", "/etc/ca.pem"),),
            ),
        ),
    ],
)
def test_each_kind_of_url_parses(url: str, expected: RedisTarget) -> None:
    """One server, Sentinel and Cluster URLs parse into mode, TLS, nodes, service, database and credentials."""
    target = parse(url)
    assert (target.mode, target.tls, target.nodes, target.service, target.db) == (
        expected.mode,
        expected.tls,
        expected.nodes,
        expected.service,
        expected.db,
    )
    assert (target.username, target.password, target.options) == (
        expected.username,
        expected.password,
        expected.options,
    )


@pytest.mark.parametrize(
    ("url", "where"),
    [
        ("redis://:pw@10.0.0.5:6380/2", "10.0.0.5:6380"),
        ("unix:///run/redis.sock", "unix socket /run/redis.sock"),
        ("redis+sentinel://u:pw@s1:26379,s2:26379/mymaster", "sentinels s1:26379,s2:26379 (service 'mymaster')"),
        ("rediss+cluster://:pw@[::1]:7000", "cluster [::1]:7000"),
    ],
)
def test_where_names_hosts_and_never_the_password(url: str, where: str) -> None:
    """`where()`, used in log lines, names hosts and ports (and the service) and leaves the password out."""
    target = parse(url)
    assert target.where() == where
    assert "pw" not in repr(target)
