"""The cluster token and its challenge-response."""

from __future__ import annotations

import pytest

from smolcluster import auth


def test_proof_binds_token_role_both_nonces_and_id():
    token = b"s3cret"
    p = auth.proof(token, "worker", "S" * 32, "W" * 32, 2)
    assert auth.verify(token, p, "worker", "S" * 32, "W" * 32, 2)
    assert not auth.verify(b"other", p, "worker", "S" * 32, "W" * 32, 2)
    assert not auth.verify(token, p, "server", "S" * 32, "W" * 32, 2)  # no reflection
    assert not auth.verify(token, p, "worker", "X" * 32, "W" * 32, 2)  # no replay to a new challenge
    assert not auth.verify(token, p, "worker", "S" * 32, "W" * 32, 3)
    assert not auth.verify(token, None, "worker", "S" * 32, "W" * 32, 2)
    assert token.decode() not in p


def test_nonces_are_fresh():
    assert len({auth.nonce() for _ in range(100)}) == 100


def test_token_comes_from_env_first_then_the_file(tmp_path, monkeypatch):
    f = tmp_path / "token"
    f.write_text("from-file\n")
    monkeypatch.delenv(auth.TOKEN_ENV, raising=False)
    assert auth.load_token(str(f)) == b"from-file"
    assert auth.load_token(None) is None
    monkeypatch.setenv(auth.TOKEN_ENV, "from-env")
    assert auth.load_token(str(f)) == b"from-env"


def test_unreadable_or_empty_token_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(auth.TOKEN_ENV, raising=False)
    with pytest.raises(auth.AuthError, match="cannot read"):
        auth.load_token(str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(auth.AuthError, match="empty"):
        auth.load_token(str(tmp_path / "empty"))


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.5.0.1", True), ("::1", True),
                                            ("localhost", True), ("0.0.0.0", False), ("192.168.1.4", False),
                                            ("mini1.local", False)])
def test_loopback_detection(host, loopback):
    assert auth.is_loopback(host) is loopback
