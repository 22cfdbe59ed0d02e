"""Idempotency on the HTTP path: one Defender call per key, the answer replayed, 409 in flight."""

from __future__ import annotations

import pytest

from localdev.azurite import Azurite
from localdev.defender import DefenderSimulator, Fault
from shared.idempotency import IdempotencyStore
from shared.settings import DEFAULT_IDEMPOTENCY_TABLE, StorageConnection
from shared.storage import table_client
from tests.conftest import body_of, http_cancel


def test_a_repeat_replays_the_stored_answer_without_calling_defender(
    app_env: dict[str, str], sim: DefenderSimulator
) -> None:
    action_id = sim.add_action()
    first = http_cancel(action_id, headers={"Idempotency-Key": "ticket-77"})

    again = http_cancel(action_id, headers={"Idempotency-Key": "ticket-77"})

    assert first.status_code == again.status_code == 200
    assert body_of(again) == body_of(first)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert len(sim.calls()) == 1


def test_a_repeat_while_the_first_is_in_flight_gets_409(
    app_env: dict[str, str], sim: DefenderSimulator, azurite: Azurite
) -> None:
    action_id = sim.add_action()
    store = IdempotencyStore(table_client(StorageConnection(azurite.connection_string), DEFAULT_IDEMPOTENCY_TABLE))
    assert store.claim("ticket-in-flight", action_id) is None  # another instance holds it

    response = http_cancel(action_id, headers={"Idempotency-Key": "ticket-in-flight"})

    assert response.status_code == 409
    assert body_of(response)["error"]["code"] == "RequestInProgress"
    assert sim.calls("") == []


def test_a_key_reused_for_another_action_is_refused(app_env: dict[str, str], sim: DefenderSimulator) -> None:
    assert http_cancel(sim.add_action(), headers={"Idempotency-Key": "k-reuse"}).status_code == 200

    response = http_cancel(sim.add_action(), headers={"Idempotency-Key": "k-reuse"})

    assert response.status_code == 400
    assert len(sim.calls()) == 1


def test_a_server_failure_is_not_stored_so_a_retry_reaches_defender(
    app_env: dict[str, str], sim: DefenderSimulator
) -> None:
    action_id = sim.add_action()
    sim.inject(Fault("status", count=1, status=500))
    assert http_cancel(action_id, headers={"Idempotency-Key": "k-500"}).status_code == 500

    retry = http_cancel(action_id, headers={"Idempotency-Key": "k-500"})

    assert retry.status_code == 200 and "Idempotent-Replayed" not in retry.headers
    assert len(sim.calls()) == 2


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "é"])
def test_a_malformed_key_gives_400(app_env: dict[str, str], sim: DefenderSimulator, key: str) -> None:
    response = http_cancel(sim.add_action(), headers={"Idempotency-Key": key})

    assert response.status_code == 400
    assert sim.calls("") == []


def test_an_expired_key_may_be_used_again_even_for_another_action(
    app_env: dict[str, str], sim: DefenderSimulator, azurite: Azurite
) -> None:
    table = table_client(StorageConnection(azurite.connection_string), DEFAULT_IDEMPOTENCY_TABLE)
    yesterday = IdempotencyStore(table, clock=lambda: 1_000_000.0)
    assert yesterday.claim("k-expired", "11111111-1111-1111-1111-111111111111") is None
    yesterday.complete("k-expired", "11111111-1111-1111-1111-111111111111", 200, {"id": "old"})

    response = http_cancel(sim.add_action(), headers={"Idempotency-Key": "k-expired"})

    assert response.status_code == 200 and "Idempotent-Replayed" not in response.headers
    assert len(sim.calls()) == 1
