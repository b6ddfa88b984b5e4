"""mTLS (``spec.server.tls``) end to end on loopback, with certificates this test makes.

A CA (``tests.support.certs``, the ``cryptography`` package) signs one certificate for
``127.0.0.1`` / ``localhost`` good for server and client auth, laid out as a
``kubernetes.io/tls`` Secret is mounted (``tls.crt``, ``tls.key``, ``ca.crt``). Shown:

- in-process servers (``Cluster``): inference and training passes between peers over mutual
  TLS equal the reference network; a caller without a client certificate, or with one from
  another CA, is refused on the peer port even with the network's key;
- ``mpnn run --serve --tls-dir``: ``tritonclient.http`` (``ssl=True`` with ``ssl_options``, or an
  ``ssl_context_factory``) and ``tritonclient.grpc`` (``root_certificates``) get the right
  predictions from every partition; clients without the CA, or in plaintext, are refused on
  REST and gRPC; a signed peer call without a client certificate is refused.
"""

from __future__ import annotations

import ssl
import sys
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from partition_server.api.distributor import Distribution
from partition_server.api.peer_auth import PeerCredentials, SignedChannel, SigningInterceptor, TlsFiles, generate_key
from partition_server.api.protos import mpnn_pb2 as pb
from partition_server.api.protos import mpnn_pb2_grpc as pb_grpc
from partition_server.engine import OptimizerConfig
from tests.process.test_inference import INPUTS, LAYERS, PARTITIONS, RUN_TIMEOUT, TOL, forward, read_endpoints
from tests.support.certs import CA
from tests.support.serve_run import served_by_mpnn_run, write_imported_network
from tests.support.dataplane import Cluster, batch, reference

NAME = "tiny-tls"


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA()


def _peer_call(address: str, credentials: grpc.ChannelCredentials | None, key: bytes, network: str) -> grpc.RpcError:
    """A signed ``Status`` call to the peer port at ``address`` over ``credentials`` (None:
    plaintext); returns its refusal."""
    inner = (grpc.secure_channel(address, credentials) if credentials is not None
             else grpc.insecure_channel(address))
    channel = SignedChannel(inner, SigningInterceptor(key, network=network, audience=address))
    try:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.PartitionStub(channel).Status(pb.StatusRequest(), timeout=10)
        return err.value
    finally:
        channel.close()


def _assert_refused_without_client_cert(address: str, ca_pem: bytes, key: bytes, network: str) -> None:
    other = CA("another CA")
    cert, other_key = other.issue("intruder")
    for credentials in (grpc.ssl_channel_credentials(root_certificates=ca_pem),  # no client certificate
                        grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=other_key,
                                                     certificate_chain=cert),  # one from another CA
                        None):  # plaintext
        err = _peer_call(address, credentials, key, network)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err  # the handshake fails; no call is made


def test_peers_train_and_infer_over_mutual_tls_and_refuse_callers_without_a_client_certificate(tmp_path, ca):
    tls = TlsFiles.from_dir(ca.secret_dir(tmp_path / "tls"))
    credentials = PeerCredentials("tiny", generate_key(), tls)
    with Cluster(tmp_path, 2, Distribution("balanced"), credentials=credentials) as cluster:
        driver = cluster.driver(timeout=30)
        driver.wait_ready(timeout=30)
        ref = reference()
        x, y = batch(1)
        out, _, _ = driver.step(x)
        np.testing.assert_allclose(out, ref.forward(x), **TOL)
        optimizer = OptimizerConfig("sgd", learning_rate=0.1, momentum=0.0)
        ref = reference(optimizer=optimizer)
        want = ref.train_step(x, y)
        out, loss, correct = driver.step(x, y, optimizer)
        np.testing.assert_allclose(out, want.outputs, **TOL)
        assert loss == pytest.approx(want.loss, rel=1e-5) and correct == want.correct
        for (w, b), (w_ref, b_ref) in zip(cluster.params(), ref.params):
            np.testing.assert_allclose(w, w_ref, **TOL)
            np.testing.assert_allclose(b, b_ref, **TOL)
        sent, nbytes = driver.traffic()
        assert sent > 0 and nbytes > 0  # the partitions did exchange activations, over TLS
        _assert_refused_without_client_cert(cluster.table.addresses[0], ca.pem, credentials.key, "tiny")
        assert len(driver.status()) == 2  # and the network's own calls still go through


@pytest.fixture(scope="module")
def served(tmp_path_factory, ca):
    """``mpnn run --serve --tls-dir`` with imported weights; yields endpoints, files and expected outputs."""
    root = tmp_path_factory.mktemp("tls")
    tls_dir = ca.secret_dir(root / "tls")
    rng = np.random.default_rng(7)
    params = write_imported_network(root, rng, NAME, INPUTS, LAYERS, PARTITIONS)
    x = rng.uniform(0, 1, (5, INPUTS)).astype(np.float32)
    workdir = root / "work"
    cmd = [sys.executable, "-m", "partition_server.cli", "run", str(root / "net.yaml"),
           "--workdir", str(workdir), "--tls-dir", str(tls_dir), "--serve"]
    with served_by_mpnn_run(cmd, read_endpoints, RUN_TIMEOUT, "mpnn run --serve --tls-dir") as endpoints:
        yield {**endpoints, "x": x, "expected": forward(params, x), "tls": tls_dir, "workdir": workdir}


def _http_infer(client: httpclient.InferenceServerClient, x: np.ndarray) -> np.ndarray:
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    return client.infer(NAME, [inp]).as_numpy("output")


def _grpc_infer(client: grpcclient.InferenceServerClient, x: np.ndarray) -> np.ndarray:
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(NAME, [inp], client_timeout=30).as_numpy("output")


def test_serve_prints_https_endpoints(served):
    assert served["rest"].startswith("https://127.0.0.1:"), served["lines"]
    assert all(rest.startswith("https://") for rest, _ in served["partitions"]), served["lines"]


def test_tritonclient_http_with_the_ca_gets_the_right_predictions(served):
    ca_file = str(served["tls"] / "ca.crt")
    for rest, _ in served["partitions"]:
        host = rest.removeprefix("https://")
        client = httpclient.InferenceServerClient(host, ssl=True, ssl_options={"ca_certs": ca_file})
        try:
            assert client.is_server_ready()
            np.testing.assert_allclose(_http_infer(client, served["x"]), served["expected"], **TOL)
        finally:
            client.close()
    # The other way tritonclient takes: a factory of the SSL context.
    host = served["rest"].removeprefix("https://")
    client = httpclient.InferenceServerClient(
        host, ssl=True, ssl_context_factory=lambda: ssl.create_default_context(cafile=ca_file))
    try:
        np.testing.assert_allclose(_http_infer(client, served["x"]), served["expected"], **TOL)
    finally:
        client.close()


def test_tritonclient_grpc_with_root_certificates_gets_the_right_predictions(served):
    ca_file = str(served["tls"] / "ca.crt")
    for _, address in served["partitions"]:
        client = grpcclient.InferenceServerClient(address, ssl=True, root_certificates=ca_file)
        try:
            assert client.is_server_ready()
            np.testing.assert_allclose(_grpc_infer(client, served["x"]), served["expected"], **TOL)
        finally:
            client.close()


def test_clients_without_the_ca_are_refused(served):
    host = served["rest"].removeprefix("https://")
    # REST: the default trust store does not know the CA; plaintext HTTP is not spoken.
    with pytest.raises(urllib.error.URLError) as err:
        urllib.request.urlopen(f"https://{host}/v2/health/live", timeout=10)
    assert isinstance(err.value.reason, ssl.SSLCertVerificationError), err.value
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://{host}/v2/health/live", timeout=10).read()
    client = httpclient.InferenceServerClient(host, ssl=True)
    try:
        with pytest.raises(Exception) as err:
            _http_infer(client, served["x"])
        assert "CERTIFICATE_VERIFY_FAILED" in str(err.value) or isinstance(err.value, ssl.SSLError), err.value
    finally:
        client.close()
    # gRPC: without root certificates (the system's), and in plaintext.
    for client in (grpcclient.InferenceServerClient(served["grpc"], ssl=True),
                   grpcclient.InferenceServerClient(served["grpc"])):
        try:
            with pytest.raises(InferenceServerException) as err:
                _grpc_infer(client, served["x"])
            assert "UNAVAILABLE" in str(err.value.status()), err.value
        finally:
            client.close()


def test_a_peer_without_a_client_certificate_is_refused(served):
    key = (served["workdir"] / "peer-key").read_bytes()
    peer = served["lines"][-2].split()[-1]  # the last partition's peer address
    _assert_refused_without_client_cert(peer, (served["tls"] / "ca.crt").read_bytes(), key, NAME)
