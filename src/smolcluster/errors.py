"""Every error smolcluster expects, in one place, each with the exit code the CLI gives it.

A `SmolclusterError`'s message is the whole story: the CLI prints it as one line (no traceback)
and exits with its `exit_code`. Anything else that escapes is a bug and keeps its traceback.
Imports nothing heavy, so `import smolcluster` and the CLI's error path stay fast.
"""

from __future__ import annotations

MAX_ERROR = 1000
"""Characters of an error message at most: whatever it quotes (a key, a value, a peer's bytes)."""


def cut(text: str, limit: int = 200) -> str:
    """`text`, or its first `limit` characters and how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class SmolclusterError(Exception):
    """Base of every expected error; `exit_code` is what the CLI exits with."""

    exit_code = 1


class ConfigError(SmolclusterError, ValueError):
    """A config file, override or flag is invalid; the message names the file and the key."""

    exit_code = 2

    def __init__(self, message: object = "") -> None:
        super().__init__(cut(str(message), MAX_ERROR))


class DataFileError(ConfigError):
    """A dataset file the user pointed at is malformed (a CSV's bad cell); names file, row, column."""


class DataError(SmolclusterError):
    """The dataset files are missing or not what they claim to be."""


class AuthError(SmolclusterError):
    """The token is missing, unreadable or wrong; the message says which."""


class CheckpointError(SmolclusterError):
    """A checkpoint is missing, unreadable, or belongs to another job."""


class ModelFileError(SmolclusterError):
    """A saved model file is missing, unreadable, or not one of ours."""


class ClusterError(SmolclusterError):
    """Training cannot go on (too few workers, nobody joined); the message says who and when."""


class WorkerError(SmolclusterError):
    """The worker cannot go on: unreachable, refused, or the server failed; the message says why."""


class ServerLost(WorkerError):
    """The connection to the server broke (it may come back: see cluster.reconnect)."""


class HandshakeCut(ServerLost):
    """The server cut our handshake short (closed, reset, or 'server busy': it sheds connections that
    have not authenticated when it is flooded); another try may well go through."""


class ProtocolError(Exception):
    """A peer sent something that is not a valid frame here; the message names the peer.

    Not a SmolclusterError: it never reaches the CLI (the server drops the peer, a worker turns it
    into a WorkerError)."""


class ConnectionClosed(ConnectionError):
    """The peer closed the connection (cleanly or not); `cut` says what frame it cut short, if any."""

    def __init__(self, message: str, cut: str = "") -> None:
        super().__init__(message + cut)
        self.cut = cut
