"""A standby's read-only replay may make keys for decisions it then drops (``Processor.follow``):
they are forgotten, never written, and the identity gets a key that will be written when used."""

from __future__ import annotations

from cdp_kit.vault import PersonVault


def test_keys_made_and_never_committed_are_forgotten_and_made_afresh() -> None:
    vault = PersonVault(None, None)  # type: ignore[arg-type]  # nothing here reaches NATS
    [dropped] = vault.refs_for([("email", "ann@example.com")])
    assert dropped in vault.known()
    assert vault.forget_pending() == 1
    assert dropped not in vault.known()
    assert vault.forget_pending() == 0
    [again] = vault.refs_for([("email", "ann@example.com")])
    assert again != dropped  # a new key, pending for the next commit
    assert again in vault.known()
