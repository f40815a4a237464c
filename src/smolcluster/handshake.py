"""The handshake, both sides: who may join, proved with the cluster token, over TLS if configured.

    server --CHALLENGE{nonce, auth}--> worker
    worker --HELLO{worker_id, nonce, proof, fingerprint, host, device}--> server
    server --WELCOME{run shape, W&B group, proof}--> worker     (or REJECT{reason})

The proofs are HMACs over both nonces (auth.py), so each side proves it knows the token without
sending it; the fingerprint (config keys that must agree, the model's layout, the data's
identity) is compared key by key, and a refusal names what differs.
"""

from __future__ import annotations

import os
import random
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any

from loguru import logger

from smolcluster import auth, wire
from smolcluster.admission import BUSY
from smolcluster.config import ClusterConfig, diff_fingerprints
from smolcluster.errors import AuthError, HandshakeCut, ServerLost, WorkerError
from smolcluster.link import Link, connect
from smolcluster.tlsio import SharedTLS
from smolcluster.wire import MsgType

# --- the server's side -------------------------------------------------------------------------


def server_tls(c: ClusterConfig) -> ssl.SSLContext | None:
    """The server's TLS context, if `tls_cert` is set."""
    if not c.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(c.tls_cert, c.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise AuthError(f"cluster.tls_cert/tls_key: cannot load ({e})") from None
    return ctx


def challenge(token: bytes | None) -> tuple[str, list[bytes | memoryview]]:
    """A fresh nonce and the CHALLENGE frame carrying it."""
    nonce = auth.nonce()
    return nonce, wire.frame(MsgType.CHALLENGE, {"nonce": nonce, "auth": token is not None})


@dataclass(frozen=True)
class Hello:
    """A HELLO the server accepted: who it is and what the WELCOME must prove."""

    worker_id: int
    worker_nonce: str
    host: str
    device: str = ""
    """What it computes on (devices.describe), for the log and the summary."""


def check_hello(hello: dict[str, Any], *, num_workers: int, token: bytes | None, server_nonce: str,
                taken: dict[int, str], fingerprint: dict[str, Any]) -> Hello | str:
    """The accepted HELLO, or the reason to refuse it. `taken` maps live worker ids to their addresses."""
    wid, n = hello.get("worker_id"), num_workers
    worker_nonce, theirs = hello.get("nonce"), hello.get("fingerprint")
    if not isinstance(wid, int) or isinstance(wid, bool) or not 1 <= wid <= n:
        return f"worker id {wid!r} is not in 1..{n} (num_workers={n})"
    if not isinstance(worker_nonce, str) or not 16 <= len(worker_nonce) <= 128:
        return "HELLO without a valid nonce (an older or foreign client?)"
    if token is not None and not auth.verify(token, hello.get("proof"), "worker", server_nonce, worker_nonce, wid):
        return "wrong or missing cluster token"
    if wid in taken:
        return f"worker id {wid} is already connected from {taken[wid]}"
    diffs = diff_fingerprints(fingerprint, theirs if isinstance(theirs, dict) else {})
    if diffs:
        return "job differs from the server's: " + "; ".join(diffs[:5])
    return Hello(wid, worker_nonce, str(hello.get("host", "?"))[:64], str(hello.get("device", "?"))[:100])


def welcome(hello: Hello, token: bytes | None, server_nonce: str, **run: Any) -> list[bytes | memoryview]:
    """The WELCOME frame: the run's shape, and the server's proof that it knows the token."""
    body: dict[str, Any] = {"worker_id": hello.worker_id, **run}
    if token is not None:
        body["proof"] = auth.proof(token, "server", server_nonce, hello.worker_nonce, hello.worker_id)
    return wire.frame(MsgType.WELCOME, body)


# --- the worker's side -------------------------------------------------------------------------


def dial(c: ClusterConfig, address: tuple[str, int], peer: str, timeout: float) -> socket.socket | SharedTLS:
    """Connect (retrying while the server starts), then TLS if `tls_ca` is set."""
    sock = connect(*address, timeout)
    if not c.tls_ca:
        return sock
    ctx = ssl.create_default_context(cafile=c.tls_ca)
    try:
        return SharedTLS(ctx.wrap_socket(sock, server_hostname=c.tls_server_name or address[0]))
    except (ssl.SSLError, OSError) as e:
        sock.close()
        # Closed or reset mid-handshake: a flooded server sheds it. A TLS error proper stays an error.
        cut = isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) or not isinstance(e, ssl.SSLError)
        raise (HandshakeCut if cut else WorkerError)(f"TLS with the {peer} failed: {e}") from None


def _control(link: Link, mtype: MsgType, timeout: float) -> dict[str, Any]:
    """A handshake frame; the connection lost or 'server busy' instead is a HandshakeCut."""
    try:
        return link.json(mtype, timeout)
    except HandshakeCut:
        raise
    except ServerLost as e:
        raise HandshakeCut(str(e)) from None
    except WorkerError as e:
        if BUSY in str(e):
            raise HandshakeCut(str(e)) from None
        raise


def handshake(link: Link, c: ClusterConfig, token: bytes | None, fingerprint: dict[str, Any],
              device: str = "") -> dict[str, Any]:
    """Prove the token (if any), present our fingerprint, and check the server proves it too."""
    try:
        offer = _control(link, MsgType.CHALLENGE, c.handshake_timeout)
    except HandshakeCut as e:
        hint = "" if c.tls_ca else " (if the server uses TLS, set cluster.tls_ca)"
        raise HandshakeCut(f"no handshake from the {link.peer}: {e}{hint}") from None
    server_nonce, my_nonce = str(offer.get("nonce", "")), auth.nonce()
    if offer.get("auth") and token is None:
        raise WorkerError(f"the {link.peer} requires a cluster token: set ${auth.TOKEN_ENV} or cluster.token_file")
    if token is not None and not offer.get("auth"):  # refuse before it could count us in
        raise WorkerError(f"the {link.peer} asks for no cluster token but we have one: it is not our "
                          f"cluster's server (or it was started without ${auth.TOKEN_ENV})")
    hello: dict[str, Any] = {"worker_id": link.id, "host": socket.gethostname(), "pid": os.getpid(),
                             "nonce": my_nonce, "fingerprint": fingerprint, "device": device}
    if token is not None:
        hello["proof"] = auth.proof(token, "worker", server_nonce, my_nonce, link.id)
    try:
        link.send(MsgType.HELLO, hello)
    except ServerLost as e:
        raise HandshakeCut(str(e)) from None
    answer = _control(link, MsgType.WELCOME, c.handshake_timeout)
    if token is not None and not auth.verify(token, answer.get("proof"), "server", server_nonce, my_nonce, link.id):
        raise WorkerError(f"the {link.peer} did not prove it knows the cluster token; not training with it")
    return answer


def join(c: ClusterConfig, address: tuple[str, int], peer: str, worker_id: int, token: bytes | None,
         fingerprint: dict[str, Any], since: float | None = None, device: str = "") -> tuple[Link, dict[str, Any]]:
    """Dial and handshake; while the server cuts the handshake short (it sheds connections when
    flooded), try again with backoff until `connect_timeout` (counted from `since`, a loss)."""
    deadline = (since or time.monotonic()) + c.connect_timeout
    delay, tries = 0.1, 1
    while True:
        link = None
        try:
            link = Link(dial(c, address, peer, max(deadline - time.monotonic(), 1.0)), peer, worker_id)
            answer = handshake(link, c, token, fingerprint, device)
            break
        except HandshakeCut as e:
            if link is not None:
                link.close()
            if time.monotonic() + delay > deadline:
                raise WorkerError(f"{e}; gave up after {tries} tries in {c.connect_timeout:g} s "
                                  "(cluster.connect_timeout)") from None
            if tries == 1:
                logger.warning(f"{e}; trying again until cluster.connect_timeout ({c.connect_timeout:g} s)")
        except BaseException:
            if link is not None:
                link.close()
            raise
        time.sleep(delay * random.uniform(0.5, 1.0))  # jitter: retries of many workers spread out
        delay, tries = min(delay * 2, 2.0), tries + 1
    if tries > 1:
        logger.info(f"the handshake with the {peer} went through on try {tries}")
    return link, answer
