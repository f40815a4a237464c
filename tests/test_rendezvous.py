"""The torch backend's door: where a process sits (torchrun's environment or --id), the network
opt-in, and the handshake through a real TCPStore."""

from __future__ import annotations

import threading

import pytest
from torch.distributed import TCPStore

from smolcluster import rendezvous
from smolcluster.config import ClusterConfig
from smolcluster.errors import ClusterError, ConfigError
from smolcluster.rendezvous import Launch

FINGERPRINT = {"training": {"learning_rate": 0.003}, "cluster": {"seed": 42}}


def test_torchrun_environment_gives_the_rank(monkeypatch):
    assert rendezvous.from_torchrun({}) is None
    got = rendezvous.from_torchrun({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                                    "MASTER_PORT": "1234"})
    assert got == Launch(1, 2, 1, "h", 1234, torchrun=True)
    with pytest.raises(ConfigError, match="RANK"):
        rendezvous.from_torchrun({"RANK": "x", "WORLD_SIZE": "2"})
    for k, v in {"RANK": "3", "WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match="num_workers is 2 but torchrun started 4"):
        rendezvous.plan(ClusterConfig(num_workers=2), None, None)
    with pytest.raises(ConfigError, match="--id 1 but torchrun made this rank 3"):
        rendezvous.plan(ClusterConfig(num_workers=4), 1, None)


def test_without_torchrun_the_id_places_the_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    c = ClusterConfig(host_ip="10.0.0.5", bind="10.0.0.5", port=4000, num_workers=3)
    assert rendezvous.plan(c, 1, None) == Launch(0, 3, 0, "10.0.0.5", 4000, torchrun=False)
    assert rendezvous.plan(c, 3, None).rank == 2
    with pytest.raises(ConfigError, match="--id"):
        rendezvous.plan(c, None, None)
    with pytest.raises(ConfigError, match="expected 1..3"):
        rendezvous.plan(c, 4, None)


def test_a_reachable_address_needs_the_opt_in(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    launch = Launch(0, 2, 0, "10.0.0.5", 4000, torchrun=False)
    with pytest.raises(ConfigError, match="cluster.torch_trust_network"):
        rendezvous.check_network(ClusterConfig(), launch)
    rendezvous.check_network(ClusterConfig(torch_trust_network=True), launch)
    rendezvous.check_network(ClusterConfig(), Launch(0, 2, 0, "127.0.0.1", 4000, torchrun=False))
    assert rendezvous.os.environ["GLOO_SOCKET_IFNAME"].startswith("lo")  # gloo stays on loopback too


def _meet(tokens: dict[int, bytes | None], prints: dict[int, dict]) -> dict[int, object]:
    """Rank 0 and rank 1 run the handshake through a real store; each one's result or error."""
    from smolcluster.runner import free_port

    port = free_port()
    c = ClusterConfig(port=port, join_timeout=10, connect_timeout=10)
    out: dict[int, object] = {}

    def side(rank: int) -> None:
        store = TCPStore("127.0.0.1", port, 2, rank == 0, wait_for_workers=False)
        launch = Launch(rank, 2, rank, "127.0.0.1", port, torchrun=False)
        try:
            out[rank] = rendezvous.admit(store, c, launch, tokens[rank], prints[rank], {"host": f"h{rank}"},
                                         {"start": 7} if rank == 0 else {})
        except ClusterError as e:
            out[rank] = e

    threads = [threading.Thread(target=side, args=(r,)) for r in (0, 1)]
    threads[0].start()
    threads[1].start()
    for t in threads:
        t.join(30)
    return out


def test_the_handshake_admits_the_same_job_with_the_same_token():
    got = _meet({0: b"t" * 16, 1: b"t" * 16}, {0: FINGERPRINT, 1: FINGERPRINT})
    assert got[1] == {"start": 7}
    assert got[0]["ranks"][1]["host"] == "h1"


@pytest.mark.parametrize("tokens, theirs, why", [
    ({0: b"t" * 16, 1: b"u" * 16}, FINGERPRINT, "cluster token"),
    ({0: b"t" * 16, 1: None}, FINGERPRINT, "cluster token"),
    ({0: None, 1: b"t" * 16}, FINGERPRINT, "worker 1 has none"),
    ({0: None, 1: None}, {**FINGERPRINT, "training": {"learning_rate": 0.1}}, "learning_rate"),
])
def test_the_handshake_refuses_another_token_or_job_on_both_sides(tokens, theirs, why):
    got = _meet(tokens, {0: FINGERPRINT, 1: theirs})
    assert isinstance(got[0], ClusterError) and why in str(got[0]), got[0]
    assert isinstance(got[1], ClusterError) and "refused this rank" in str(got[1]) and why in str(got[1]), got[1]
