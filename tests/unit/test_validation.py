"""Request validation rules, below the HTTP layer."""

from __future__ import annotations

import uuid

import pytest

from shared.cancel.commands import correlation_id, parse_action_id, parse_comment
from shared.errors import InvalidRequest


def test_action_id_is_canonicalised_to_lower_case() -> None:
    assert parse_action_id("988CC94E-7A8F-4B28-AB65-54970C5D5018") == "988cc94e-7a8f-4b28-ab65-54970c5d5018"


@pytest.mark.parametrize("raw", [None, 42, "988cc94e-7a8f-4b28-ab65-54970c5d5018/", "x" * 36])
def test_anything_but_a_guid_string_is_refused(raw: object) -> None:
    with pytest.raises(InvalidRequest):
        parse_action_id(raw)


def test_comment_prefers_the_upstream_spelling() -> None:
    assert parse_comment({"Comment": "upper", "comment": "lower"}) == "upper"


@pytest.mark.parametrize("given", ["", "a b", "x" * 129, "é", "a\nb"])
def test_unsafe_correlation_ids_are_replaced(given: str) -> None:
    replaced = correlation_id(given)

    assert replaced != given and uuid.UUID(replaced).version == 4


def test_a_missing_correlation_id_gets_a_fresh_one_each_time() -> None:
    first, second = correlation_id(None), correlation_id(None)

    assert uuid.UUID(first).version == uuid.UUID(second).version == 4 and first != second


def test_a_safe_correlation_id_is_kept() -> None:
    assert correlation_id("INC-4711:a.b_c") == "INC-4711:a.b_c"
