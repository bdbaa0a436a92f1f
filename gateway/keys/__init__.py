"""Issuer keys, in three layers whose imports run one way (cache -> shared -> fetch):

- `fetch`: OIDC discovery and JWKS fetching and validation for one issuer (also what `gateway probe-issuer` runs);
- `shared`: the replica-shared tier, key sets published through the store under the issuer's trust id;
- `cache`: the per-process cache per issuer (TTL, unknown-kid cooldown, single flight, last good set).
"""
