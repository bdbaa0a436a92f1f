from __future__ import annotations

from typing import Any

import pytest

from gateway.testing import TestIssuer
from tests.conftest import description, error_code, gitlab_issuer


async def test_suspended_issuer_mints_nothing_and_fetches_nothing(make_gateway: Any, issuer: TestIssuer) -> None:
    """An issuer with `enabled = false` keeps loading but its tokens are refused without any network I/O."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer, enabled=False)})
    response = await gateway.mint(issuer.gitlab_token())
    assert response.status_code == 422
    assert error_code(response) == "invalid-payload"
    assert "suspended" in description(response)
    assert issuer.requests == []


@pytest.mark.parametrize(
    ("claims", "allowed"),
    [
        pytest.param({"ref_protected": "true"}, True, id="protected"),
        pytest.param({"ref_protected": "false"}, False, id="unprotected"),
    ],
)
async def test_require_protected_ref(
    make_gateway: Any, issuer: TestIssuer, claims: dict[str, Any], allowed: bool
) -> None:
    """With `require_protected_ref`, only jobs on protected refs mint; others are told to protect the ref."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer, require_protected_ref=True)})
    response = await gateway.mint(issuer.gitlab_token(**claims))
    if allowed:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 422
        assert error_code(response) == "invalid-publisher"
        assert "not protected" in description(response)


async def test_require_protected_ref_refuses_a_token_that_does_not_say(make_gateway: Any, issuer: TestIssuer) -> None:
    """A token without `ref_protected` cannot prove its ref is protected, so the policy refuses it."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer, require_protected_ref=True)})
    response = await gateway.mint(issuer.gitlab_token(ref_protected=None))
    assert error_code(response) == "invalid-publisher"


@pytest.mark.parametrize(
    ("runner", "allowed"),
    [
        pytest.param("gitlab-hosted", True, id="hosted"),
        pytest.param("self-hosted", False, id="self-hosted"),
    ],
)
async def test_runner_environments(make_gateway: Any, issuer: TestIssuer, runner: str, allowed: bool) -> None:
    """`runner_environments` admits only jobs on the listed kinds of runner."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer, runner_environments=["gitlab-hosted"])})
    response = await gateway.mint(issuer.gitlab_token(runner_environment=runner))
    if allowed:
        assert response.status_code == 200, response.text
    else:
        assert error_code(response) == "invalid-publisher"
        assert "self-hosted" in description(response)
