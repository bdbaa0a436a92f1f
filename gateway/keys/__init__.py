"""Issuer keys, in three layers whose imports run one way (cache -> shared -> fetch):

- `fetch`: OIDC discovery and JWKS fetching and validation for one issuer (also what `gateway probe-issuer` runs);
- `shared`: the replica-shared tier, key sets published through the store under the issuer's trust id;
- `static`: key sets read from an issuer's `jwks_file` (same key rules, no network, never shared);
- `cache`: the per-process cache per issuer (TTL, unknown-kid cooldown, single flight, last good set).
"""
