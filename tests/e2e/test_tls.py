"""Optional TLS: a cluster trains over it, and a mismatched side fails with a clear message."""

from __future__ import annotations

import subprocess

import pytest

from helpers import Cluster

pytestmark = pytest.mark.timeout(150)


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """A throwaway self-signed certificate for 127.0.0.1 (the CA the workers trust is the cert itself)."""
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "1", "-subj", "/CN=smolcluster-test", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
        check=True, capture_output=True,
    )
    return d / "cert.pem", d / "key.pem"


def test_a_cluster_trains_over_tls(tmp_path, cert):
    crt, key = cert
    args = ["--set", f"cluster.tls_cert={crt}", "--set", f"cluster.tls_key={key}", "--set", f"cluster.tls_ca={crt}"]
    cluster = Cluster(tmp_path, workers=2, args=args).start()
    codes = cluster.wait(120)
    assert all(code == 0 for code in codes.values()), cluster.logs()
    assert "(TLS)" in cluster.procs["server"].output
    cluster.assert_replicas_equal([1, 2])


def test_a_plaintext_worker_is_told_the_server_speaks_tls(tmp_path, cert):
    crt, key = cert
    cluster = Cluster(tmp_path, workers=1, args=["--set", "cluster.handshake_timeout=2"])
    cluster.start_server("--set", f"cluster.tls_cert={crt}", "--set", f"cluster.tls_key={key}")
    cluster.start_worker(1)
    cluster.wait_for_log("worker 1", "set cluster.tls_ca")
    cluster.kill()


def test_a_tls_worker_refuses_a_plaintext_server(tmp_path, cert):
    crt, _ = cert
    cluster = Cluster(tmp_path, workers=1)
    cluster.start_server()
    cluster.start_worker(1, "--set", f"cluster.tls_ca={crt}")
    cluster.wait_for_log("worker 1", "TLS with the server")
    cluster.kill()
