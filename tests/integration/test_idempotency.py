"""Idempotency on the HTTP path: one Defender call per key, the answer replayed, 409 in flight."""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from azure.core.exceptions import ServiceRequestError

from localdev.azurite import Azurite
from localdev.defender import DefenderSimulator, Fault
from shared.config.settings import DEFAULT_IDEMPOTENCY_TABLE, StorageConnection
from shared.errors import RequestInProgress
from shared.idempotency.keys import http_key
from shared.idempotency.record import Claim, StoredAnswer
from shared.idempotency.table import IdempotencyStore
from shared.storage.clients import table_client
from tests.support.rig import GUID, body_of, http_cancel


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
    store = IdempotencyStore(
        table_client(StorageConnection(connection_string=azurite.connection_string), DEFAULT_IDEMPOTENCY_TABLE)
    )
    assert isinstance(store.claim(http_key("function-key", "ticket-in-flight"), action_id), Claim)  # held elsewhere

    response = http_cancel(action_id, headers={"Idempotency-Key": "ticket-in-flight"})

    assert response.status_code == 409
    assert body_of(response)["error"]["code"] == "RequestInProgress"
    assert sim.calls("") == []


def test_a_key_reused_for_another_action_is_refused(app_env: dict[str, str], sim: DefenderSimulator) -> None:
    assert http_cancel(sim.add_action(), headers={"Idempotency-Key": "k-reuse"}).status_code == 200

    response = http_cancel(sim.add_action(), headers={"Idempotency-Key": "k-reuse"})

    assert response.status_code == 422 and body_of(response)["error"]["code"] == "IdempotencyKeyReused"
    assert len(sim.calls()) == 1


def test_a_refusal_is_not_stored_so_a_retry_reaches_defender(app_env: dict[str, str], sim: DefenderSimulator) -> None:
    action_id = sim.add_action()
    sim.inject(Fault("status", count=3, status=503))  # every attempt of the first request refused
    assert http_cancel(action_id, headers={"Idempotency-Key": "k-503"}).status_code == 503

    retry = http_cancel(action_id, headers={"Idempotency-Key": "k-503"})

    assert retry.status_code == 200 and "Idempotent-Replayed" not in retry.headers
    assert len(sim.calls()) == 4


@pytest.mark.parametrize("status", [500, 502, 504])
def test_an_answer_after_which_defender_may_have_acted_is_kept_and_never_sent_again(
    app_env: dict[str, str], sim: DefenderSimulator, status: int
) -> None:
    action_id = sim.add_action()
    sim.inject(Fault("status", count=1, status=status))
    first = http_cancel(action_id, headers={"Idempotency-Key": f"k-{status}"})

    retry = http_cancel(action_id, headers={"Idempotency-Key": f"k-{status}"})

    assert first.status_code == retry.status_code == status
    assert retry.headers["Idempotent-Replayed"] == "true" and body_of(retry) == body_of(first)
    assert len(sim.calls()) == 1


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "é"])
def test_a_malformed_key_gives_400(app_env: dict[str, str], sim: DefenderSimulator, key: str) -> None:
    response = http_cancel(sim.add_action(), headers={"Idempotency-Key": key})

    assert response.status_code == 400
    assert sim.calls("") == []


def test_an_expired_key_may_be_used_again_even_for_another_action(
    app_env: dict[str, str], sim: DefenderSimulator, azurite: Azurite
) -> None:
    table = table_client(StorageConnection(connection_string=azurite.connection_string), DEFAULT_IDEMPOTENCY_TABLE)
    yesterday = IdempotencyStore(table, clock=lambda: 1_000_000.0)
    held = yesterday.claim(http_key("function-key", "k-expired"), "11111111-1111-1111-1111-111111111111")
    assert isinstance(held, Claim)
    yesterday.complete(held, 200, {"id": "old"})

    response = http_cancel(sim.add_action(), headers={"Idempotency-Key": "k-expired"})

    assert response.status_code == 200 and "Idempotent-Replayed" not in response.headers
    assert len(sim.calls()) == 1


@pytest.fixture
def answers(azurite: Azurite) -> Iterator[Callable[..., IdempotencyStore]]:
    table = table_client(StorageConnection(connection_string=azurite.connection_string), DEFAULT_IDEMPOTENCY_TABLE)
    yield lambda **kw: IdempotencyStore(table, **kw)


def test_an_overtaken_holder_can_neither_overwrite_nor_delete_the_record(
    answers: Callable[..., IdempotencyStore],
) -> None:
    age = [0.0]
    store = answers(lease_seconds=60, age=lambda entity, date: age[0])
    first = store.claim("k-takeover", GUID)
    assert isinstance(first, Claim)
    age[0] = 61  # on the store's clock the first holder looks dead: the key is taken over, to be read first
    second = store.claim("k-takeover", GUID)
    assert isinstance(second, Claim) and second.abandoned and not first.abandoned
    age[0] = 0  # the second holder's claim is fresh

    store.complete(first, 200, {"late": True})  # the first holder's late answer, after the takeover
    with pytest.raises(RequestInProgress):
        store.claim("k-takeover", GUID)  # still the second holder's: not replaced by the late answer
    store.release(first)  # ... nor deleted by its late release
    with pytest.raises(RequestInProgress):
        store.claim("k-takeover", GUID)

    store.complete(second, 200, {"by": "the second holder"})
    replay = store.claim("k-takeover", GUID)
    assert isinstance(replay, StoredAnswer) and replay.body == {"by": "the second holder"}


def test_a_claim_is_judged_by_the_stores_clock_not_the_takers(answers: Callable[..., IdempotencyStore]) -> None:
    holder = answers(lease_seconds=60)
    ahead = answers(lease_seconds=60, clock=lambda: time.time() + 3600)  # a taker whose clock runs an hour ahead
    held = holder.claim("k-skew", GUID)
    assert isinstance(held, Claim)

    with pytest.raises(RequestInProgress):
        ahead.claim("k-skew", GUID)


def test_a_key_handed_back_unread_is_taken_over_at_once_and_read_first(
    answers: Callable[..., IdempotencyStore],
) -> None:
    store = answers(lease_seconds=60)
    held = store.claim("k-handed-back", GUID)
    assert isinstance(held, Claim)

    store.abandon(held)
    again = store.claim("k-handed-back", GUID)

    assert isinstance(again, Claim) and again.abandoned


def test_storing_an_answer_is_retried(answers: Callable[..., IdempotencyStore], azurite: Azurite) -> None:
    table = table_client(StorageConnection(connection_string=azurite.connection_string), DEFAULT_IDEMPOTENCY_TABLE)

    class Flaky:
        failures = 2

        def __getattr__(self, name: str) -> Any:
            return getattr(table, name)

        def update_entity(self, *args: Any, **kwargs: Any) -> Any:
            if self.failures:
                self.failures -= 1
                raise ServiceRequestError("storage hiccup")
            return table.update_entity(*args, **kwargs)

    store = IdempotencyStore(cast(Any, Flaky()), sleep=lambda _: None)
    held = store.claim("k-flaky", GUID)
    assert isinstance(held, Claim)

    store.complete(held, 200, {"id": GUID})

    assert store.claim("k-flaky", GUID) == StoredAnswer(200, {"id": GUID})


def test_a_large_answer_is_kept_whole_and_one_too_large_is_never_replayed_as_success(
    answers: Callable[..., IdempotencyStore],
) -> None:
    store = answers()
    large = {"value": [{"id": str(i), "comment": "x" * 200} for i in range(2000)]}  # ~450 KB of JSON
    held = store.claim("k-large", GUID)
    assert isinstance(held, Claim)
    store.complete(held, 200, large)
    assert store.claim("k-large", GUID) == StoredAnswer(200, large)

    # Defender's answers are capped at 1 MiB, which always fits compressed; past that it cannot.
    noise = {"pad": base64.b64encode(secrets.token_bytes(1100 * 1024)).decode()}
    held = store.claim("k-noise", GUID)
    assert isinstance(held, Claim)
    store.complete(held, 200, noise)
    replay = store.claim("k-noise", GUID)
    assert isinstance(replay, StoredAnswer)
    assert replay.status == 502 and replay.body["error"]["code"] == "AnswerNotStored"
