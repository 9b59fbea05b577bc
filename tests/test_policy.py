"""Authorization is a pure function, and it fails closed."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtlsproxy.config import AllowRule
from mtlsproxy.denylist import parse_deny_list
from mtlsproxy.identity import Identity
from mtlsproxy.policy import denied_by, is_allowed, rule_matches

PLAYER = Identity(
    subject="CN=player-1,OU=players,OU=eu",
    issuer="CN=test issuing CA",
    cn="player-1",
    ous=("players", "eu"),
    dns=("P1.Game.Example",),
    ips=(),
    uris=("spiffe://game.example/player/1",),
    spiffe_id="spiffe://game.example/player/1",
    serial="0abc",
    sha256="ab" * 32,
    not_before=datetime(2026, 1, 1, tzinfo=UTC),
    not_after=datetime(2026, 1, 2, tzinfo=UTC),
)


def test_no_rules_admits_every_verified_client() -> None:
    assert is_allowed(None, PLAYER)


def test_empty_rule_list_admits_no_one() -> None:
    assert not is_allowed([], PLAYER)


@pytest.mark.parametrize(
    ("rule", "matches"),
    [
        (AllowRule(cn="player-1"), True),
        (AllowRule(cn="Player-1"), False),  # CN is exact
        (AllowRule(ou="players"), True),
        (AllowRule(ou="eu"), True),
        (AllowRule(ou="admins"), False),
        (AllowRule(dns="p1.game.example"), True),  # DNS is case-insensitive
        (AllowRule(dns="game.example"), False),
        (AllowRule(uri="spiffe://game.example/player/1"), True),
        (AllowRule(uri="spiffe://game.example/player"), False),
        (AllowRule(uri_prefix="spiffe://game.example"), True),
        (AllowRule(uri_prefix="spiffe://game.example/player/"), True),
        (AllowRule(uri_prefix="spiffe://game.example/player"), True),
        (AllowRule(uri_prefix="spiffe://game.example/play"), False),  # boundary
        (AllowRule(uri_prefix="spiffe://game.ex"), False),
        (AllowRule(sha256="AB" * 32), True),
        (AllowRule(sha256="sha256:" + "ab" * 32), True),
        (AllowRule(sha256="cd" * 32), False),
        (AllowRule(cn="player-1", ou="players"), True),  # fields AND
        (AllowRule(cn="player-1", ou="admins"), False),
    ],
)
def test_rule_fields(rule: AllowRule, matches: bool) -> None:
    assert rule_matches(rule, PLAYER) is matches
    assert is_allowed([AllowRule(cn="nobody"), rule], PLAYER) is matches  # rules OR


def test_trust_domain_prefix_does_not_leak_to_lookalike_domains() -> None:
    evil = msgspec_replace(PLAYER, uris=("spiffe://game.example.evil.test/player/1",))
    assert not rule_matches(AllowRule(uri_prefix="spiffe://game.example"), evil)


def test_a_rule_with_no_fields_matches_nothing() -> None:
    # The config refuses such a rule; this is the second line of defence.
    rule = AllowRule(cn="x")
    msgspec.structs.force_setattr(rule, "cn", None)
    assert not rule_matches(rule, PLAYER)


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ("sha256:" + "AB" * 32, "sha256"),
        ("serial:00:0A:BC", "serial"),
        ("uri:spiffe://game.example/player/1", "uri"),
        ("cn:player-1", "cn"),
        ("cn:player-2", None),
        ("serial:abd", None),
    ],
)
def test_deny_list(line: str, kind: str | None) -> None:
    assert denied_by(parse_deny_list(line, "deny.txt"), PLAYER) == kind


@given(cn=st.text(min_size=1, max_size=20), ou=st.text(min_size=1, max_size=20))
def test_rules_never_match_an_identity_without_those_fields(cn: str, ou: str) -> None:
    bare = msgspec_replace(PLAYER, cn=None, ous=(), dns=(), uris=(), spiffe_id=None)
    assert not rule_matches(AllowRule(cn=cn), bare)
    assert not rule_matches(AllowRule(ou=ou), bare)
    assert not rule_matches(AllowRule(uri_prefix="spiffe://" + cn), bare)


def msgspec_replace(identity: Identity, **changes: object) -> Identity:
    return msgspec.structs.replace(identity, **changes)
