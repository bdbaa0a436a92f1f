"""Key sets from a file (`[issuers.X] jwks_file`), for issuers the gateway cannot reach (behind a firewall).

The file holds the same JWKS an issuer would publish, judged by the same key rules as fetched sets
(`fetch.parse_jwks`: key types and sizes, no private members, no duplicate kids, the issuer's algorithms). Such an
issuer causes no network I/O at all and its keys never go through the replica-shared tier in Redis: the file is
the whole truth. Config reads the file (and refuses one without a usable key); the reloader watches it, so a
changed file is a new config and a new key set. `gateway probe-issuer URL --write-jwks PATH` writes one.
"""

from __future__ import annotations

import json

from ..issuers import Issuer
from .fetch import FetchError, KeySet, parse_jwks

__all__ = ["static_key_set"]

# Where a key set read from a file came from, in KeySet.source and the key-lookup metric.
SOURCE = "file"


def static_key_set(issuer: Issuer) -> KeySet:
    """The key set of an issuer with a `jwks_file`, from the text config read. Raises FetchError."""
    if issuer.jwks is None or issuer.jwks_file is None:
        raise FetchError(f"issuer {issuer.name!r} has no jwks_file")
    keys, dropped = parse_jwks(json.loads(issuer.jwks), issuer.algorithms)
    if not keys:
        # config.load refuses such a file; a set without keys is never used either way.
        raise FetchError(f"{issuer.jwks_file} has no usable key")
    return KeySet(
        keys=keys,
        fetched_at=0.0,
        jwks_uri=issuer.jwks_file.as_uri(),
        dropped=tuple(dropped),
        jwks=tuple(key.as_dict(private=False) for key in keys.values()),
        source=SOURCE,
    )
