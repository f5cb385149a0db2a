"""transport/tls.py without sockets: a client and a server TlsConnection handed each other's bytes."""
import ssl

import pytest

from actorbroker.transport.client.tls import TlsOptions, client_context
from actorbroker.transport.codec import encode_frame
from actorbroker.transport.tls import TlsConnection, server_context
from tests.certs import make_certs, openssl_available

pytestmark = pytest.mark.skipif(not openssl_available(), reason="needs the openssl command to make certificates")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def pump(a, b, limit=20):
    """Move ciphertext both ways until neither side has any to send; returns what each received."""
    got_a, got_b = bytearray(), bytearray()
    for _ in range(limit):
        if not a.outgoing and not b.outgoing:
            return bytes(got_a), bytes(got_b)
        out_a, out_b = bytes(a.outgoing), bytes(b.outgoing)
        a.outgoing.clear()
        b.outgoing.clear()
        if out_a:
            got_b += b.receive(out_a)
        if out_b:
            got_a += a.receive(out_b)
    raise AssertionError("the two sides kept talking")


def pair(certs, client_ca=None, options=None, hostname="localhost"):
    server = TlsConnection(server_context(certs.server_cert, certs.server_key, client_ca), server_side=True)
    client = TlsConnection(client_context(options or TlsOptions(ca_file=certs.ca)), server_side=False,
                           server_hostname=hostname)
    return client, server


def test_handshake_then_plaintext_both_ways(certs):
    client, server = pair(certs)
    assert client.outgoing and not server.outgoing    # the client speaks first
    pump(client, server)
    assert client.established and server.established
    big = bytes(range(256)) * 8192                     # 2 MiB: many records
    client.send(encode_frame({"op": "hello", "rid": 1}) + big)
    server.send(b"welcome")
    got_client, got_server = pump(client, server)
    assert got_server == encode_frame({"op": "hello", "rid": 1}) + big
    assert got_client == b"welcome"


def test_bytes_fed_one_at_a_time_complete_the_handshake_and_the_data(certs):
    client, server = pair(certs)
    for _ in range(10):
        for src, dst in ((client, server), (server, client)):
            data = bytes(src.outgoing)
            src.outgoing.clear()
            for i in range(len(data)):
                assert dst.receive(data[i:i + 1]) == b""
    assert client.established and server.established
    client.send(b"abc")
    record = bytes(client.outgoing)
    got = b"".join(server.receive(record[i:i + 1]) for i in range(len(record)))
    assert got == b"abc"


def test_a_client_that_does_not_trust_the_ca_refuses_the_server(certs):
    client, server = pair(certs, options=TlsOptions(ca_file=certs.rogue_ca))
    with pytest.raises(ssl.SSLCertVerificationError):
        pump(client, server)
    assert not client.established


def test_the_server_name_is_checked_by_default(certs):
    client, server = pair(certs, hostname="elsewhere.example")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        pump(client, server)
    client, server = pair(certs, options=TlsOptions(ca_file=certs.ca, check_hostname=False),
                          hostname="elsewhere.example")
    pump(client, server)
    assert client.established


def test_mutual_tls_refuses_a_client_without_a_certificate_and_tells_it(certs):
    client, server = pair(certs, client_ca=certs.client_ca)
    with pytest.raises(ssl.SSLError) as refused:
        pump(client, server)
    assert "certificate" in str(refused.value).lower()
    # the server's alert reached the client, which fails on its next read
    assert not server.established


def test_mutual_tls_refuses_a_certificate_of_another_ca(certs):
    options = TlsOptions(ca_file=certs.ca, cert_file=certs.rogue_client_cert, key_file=certs.rogue_client_key)
    client, server = pair(certs, client_ca=certs.client_ca, options=options)
    with pytest.raises(ssl.SSLError):
        pump(client, server)
    assert not server.established


def test_mutual_tls_accepts_a_certificate_of_the_client_ca(certs):
    options = TlsOptions(ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key)
    client, server = pair(certs, client_ca=certs.client_ca, options=options)
    pump(client, server)
    assert server.established
    subject = dict(item for rdn in server.peer_certificate()["subject"] for item in rdn)
    assert subject["commonName"] == "client"


def test_plaintext_protocol_bytes_are_not_tls(certs):
    server = TlsConnection(server_context(certs.server_cert, certs.server_key), server_side=True)
    with pytest.raises(ssl.SSLError):
        server.receive(encode_frame({"op": "hello", "rid": 1, "version": 1, "client": "plain"}))
    assert not server.established


def test_close_notify_ends_the_stream_for_the_peer(certs):
    client, server = pair(certs)
    pump(client, server)
    server.send(b"last words")
    server.close()
    got_client, _ = pump(client, server)
    assert got_client == b"last words" and client.peer_closed


# --- tokens over plain TCP: the session's rule (the listener's side is in test_tls.py) -----------

def hello_with_token(**config):
    from actorbroker.actors.config import BrokerConfig
    from actorbroker.transport.codec import FrameDecoder
    from actorbroker.transport.session import Session, SessionConfig
    session = Session(1, SessionConfig(BrokerConfig(tokens={"secret": ["admin"]}, **config)), 0.0)
    events = session.receive_data(encode_frame({"op": "hello", "rid": 1, "version": 1, "client": "t",
                                                "token": "secret"}), 0.0)
    decoder = FrameDecoder()
    decoder.feed(bytes(session.outbox))
    return next(iter(decoder)), [e[0] for e in events]


def test_a_token_over_plain_tcp_on_a_non_loopback_listener_is_refused_and_says_why():
    for host in ("10.1.2.3", "0.0.0.0", "::", "broker.example"):
        reply, events = hello_with_token(host=host)
        assert (reply["op"], reply["code"], reply["rid"]) == ("error", "AUTH_FAILED", 1), host
        assert "plain TCP" in reply["message"] and "--allow-plain-tokens" in reply["message"]
        assert events == ["closed"]


@pytest.mark.parametrize("config", [dict(host="127.0.0.1"), dict(host="::1"), dict(host="localhost"),
                                    dict(host="10.1.2.3", allow_plain_tokens=True),
                                    dict(host="10.1.2.3", tls_cert="/some/cert.pem")])
def test_a_token_is_taken_on_loopback_over_tls_or_when_allowed(config):
    reply, events = hello_with_token(**config)
    assert reply["op"] == "welcome" and events == ["hello"]
