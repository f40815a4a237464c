"""Cluster token and the HMAC challenge-response that proves it without sending it.

Both sides prove knowledge of the shared token over nonces the *other* side chose, so a replayed
handshake is useless and the token never crosses the wire:

    server -> CHALLENGE {nonce: S, auth: true}
    worker -> HELLO     {..., nonce: W, proof: HMAC(token, "worker|S|W|id")}
    server -> WELCOME   {..., proof: HMAC(token, "server|S|W|id")}
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
from pathlib import Path

from smolcluster.errors import AuthError

TOKEN_ENV = "SMOLCLUSTER_TOKEN"




def load_token(token_file: str | None) -> bytes | None:
    """$SMOLCLUSTER_TOKEN, else the file `cluster.token_file` names; never a command-line flag."""
    value = os.environ.get(TOKEN_ENV)
    if value:
        return value.strip().encode()
    if token_file:
        path = Path(token_file).expanduser()
        try:
            text = path.read_text().strip()
        except OSError as e:
            raise AuthError(f"cluster.token_file {path}: cannot read it ({e.strerror})") from None
        if not text:
            raise AuthError(f"cluster.token_file {path} is empty")
        return text.encode()
    return None


def nonce() -> str:
    return secrets.token_hex(16)


def proof(token: bytes, role: str, server_nonce: str, worker_nonce: str, worker_id: int) -> str:
    msg = f"smolcluster-v1|{role}|{server_nonce}|{worker_nonce}|{worker_id}".encode()
    return hmac.new(token, msg, hashlib.sha256).hexdigest()


def verify(token: bytes, claimed: object, role: str, server_nonce: str, worker_nonce: str, worker_id: int) -> bool:
    if not isinstance(claimed, str):
        return False
    return hmac.compare_digest(claimed, proof(token, role, server_nonce, worker_nonce, worker_id))


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
