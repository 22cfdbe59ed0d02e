"""Two tenants saturated at once by several instances (processes): each tenant's own Defender
windows are the judge, and each gets its whole quota."""

from __future__ import annotations

import pytest

from bench.tenants import run
from localdev.azurite import Azurite
from localdev.entra import EntraEndpoint
from localdev.identity import IdentityEndpoint
from tests.support.rig import TOKEN_SECRET

SECONDS = 15.0  # ends between bursts of the greedy schedule (at 12 s and 16 s), not inside one
PER_TENANT = 2


@pytest.mark.slow
def test_two_tenants_each_keep_their_own_windows_exactly_and_use_them_fully(
    azurite: Azurite, identity: IdentityEndpoint, entra: EntraEndpoint
) -> None:
    result = run(azurite, identity, entra, "shared", PER_TENANT, SECONDS, secret=TOKEN_SECRET)

    for name, tenant in result["tenants"].items():
        assert (tenant["calls_over_a_window"], tenant["upstream_429"]) == (0, 0), (name, tenant)
        assert tenant["utilization"] >= 0.95, (name, tenant)  # one shared key would give each about half
        assert tenant["tokens_issued"] == PER_TENANT, (name, tenant)  # one per process, not one per call
