"""TLS on the client port (serve --tls-cert/--tls-key/--tls-client-ca), and tokens refused over
plain TCP on a non-loopback listener, against a real broker over real TCP.

Certificates are made here with the openssl command (tests/certs.py). The non-loopback listener
is made here too: a network namespace with a veth pair, the broker started inside it on its end's
private address, the test connecting from outside (needs root and `ip`; skipped otherwise).
"""
import asyncio
import ipaddress
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import threading

import pytest

from actorbroker.transport.client import Client, TlsOptions
from actorbroker.transport.client import aio
from actorbroker.transport.errors import AuthFailed, BrokerError, ConnectionLost
from actorbroker.transport.tls import TlsConnection
from tests.certs import make_certs, openssl_available
from tests.util import ROOT, consumers_of, processes_of_kind, wait_for
from tests.wire import RawConnection

pytestmark = pytest.mark.skipif(not openssl_available(), reason="needs the openssl command to make certificates")

SLOW_HEARTBEAT = 60000    # nothing here may wait for a heartbeat timer
HELLO_DEADLINE_S = 10     # the broker's hello timeout (BrokerConfig.hello_timeout_ms)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def tls_options(certs, **extra):
    return TlsOptions(ca_file=certs.ca, **extra)


def tls_broker(start_broker, certs, *options, prefix=()):
    return start_broker("--tls-cert", certs.server_cert, "--tls-key", certs.server_key, *options,
                        prefix=prefix)


def connect_when_ready(broker, **options):
    """A client, once the broker takes connections again (after a process of it was killed)."""
    def attempt():
        try:
            return Client(*broker.address, connect_timeout=2, **options)
        except (OSError, ConnectionLost, BrokerError):
            return None
    return wait_for(attempt, lambda client: client is not None, timeout=15, interval=0.1)


def round_trip(client, topic, count=200):
    """Produce `count` messages (one of them 1 MiB: many TLS records) and consume them back."""
    consumer = client.subscribe(topic, "s", "exclusive")
    producer = client.producer(topic)
    payloads = [b"m%d" % i for i in range(count - 1)] + [os.urandom(1024 * 1024)]
    for payload in payloads:
        producer.send(payload)
    producer.flush()
    received = [consumer.receive(timeout=10) for _ in payloads]
    assert [m.payload for m in received] == payloads
    consumer.ack(received[-1], sync=True)


# --- round trips ----------------------------------------------------------------------------------

def test_sync_client_round_trip_over_tls(start_broker, certs, topic):
    b = tls_broker(start_broker, certs)
    with Client(*b.address, tls=tls_options(certs)) as client:
        subject = dict(item for rdn in client._sock.peer_certificate()["subject"] for item in rdn)
        assert subject["commonName"] == "server"
        assert client.welcome["op"] == "welcome"
        round_trip(client, topic)
        client.ping()


def test_asyncio_client_round_trip_over_tls_with_a_tls_url(start_broker, certs, topic):
    b = tls_broker(start_broker, certs)

    async def main():
        client = await aio.connect(f"tls://{b.host}:{b.port}", tls=tls_options(certs))
        async with client:
            consumer = await client.subscribe(topic, "s", "exclusive")
            producer = await client.producer(topic)
            payloads = [b"a%d" % i for i in range(100)] + [os.urandom(1024 * 1024)]
            for payload in payloads:
                await producer.send(payload)
            await producer.flush()
            received = [(await consumer.receive(timeout=10)).payload for _ in payloads]
            assert received == payloads
            await client.ping()

    asyncio.run(main())


def cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "actorbroker.scripts.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_cli_over_tls(start_broker, certs, topic):
    b = tls_broker(start_broker, certs)
    url = f"tls://{b.host}:{b.port}"
    sent = cli("produce", "--url", url, "--tls-ca", certs.ca, topic, "-m", "over tls", "-n", "3",
               "--dispatch", "reliable")
    assert sent.returncode == 0, sent.stderr
    assert "sent 3 messages" in sent.stdout
    got = cli("consume", "--url", url, "--tls-ca", certs.ca, topic, "-s", "cli", "--start", "earliest",
              "-n", "3", "--timeout", "20")
    assert got.returncode == 0, got.stderr
    assert got.stdout.splitlines() == ["over tls"] * 3

    untrusted = cli("topics", "--url", url)                  # the system's CAs do not know ours
    assert untrusted.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
    plain = cli("topics", "--url", f"{b.host}:{b.port}", "--tls-ca", certs.ca)
    assert plain.returncode == 1 and "need a tls:// --url" in plain.stderr


def test_serve_refuses_tls_options_it_cannot_use_before_starting_anything(tmp_path, certs):
    missing = str(tmp_path / "missing.pem")
    for options, why in [(["--tls-cert", missing], f"--tls-cert {missing}: no such file"),
                         (["--tls-cert", certs.server_cert], "the private key must then be in the --tls-cert"),
                         (["--tls-cert", certs.server_cert, "--tls-key", certs.rogue_server_key],
                          "cannot use the TLS certificate"),        # a key of another certificate
                         (["--tls-key", certs.server_key], "need --tls-cert")]:
        done = cli("serve", "--port", "0", "--data-dir", str(tmp_path / "data"), *options, timeout=30)
        assert done.returncode == 1 and why in done.stderr, (options, done.stderr)
        assert "listening" not in done.stdout


# --- who is refused -------------------------------------------------------------------------------

def test_a_client_that_does_not_trust_the_certificate_fails(start_broker, certs, topic):
    b = tls_broker(start_broker, certs)
    with pytest.raises(ssl.SSLCertVerificationError):
        Client(*b.address, tls=TlsOptions(ca_file=certs.rogue_ca))
    with pytest.raises(ssl.SSLCertVerificationError):
        Client(*b.address, tls=True)                          # the system's CAs
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        Client(*b.address, tls=tls_options(certs, server_name="elsewhere.example"))

    async def untrusted_async():
        with pytest.raises(ssl.SSLCertVerificationError):
            await aio.AsyncClient.connect(*b.address, tls=TlsOptions(ca_file=certs.rogue_ca))
    asyncio.run(untrusted_async())

    # a client that trusts it gets through, and so does one that skips the name check on purpose
    with Client(*b.address, tls=tls_options(certs, server_name="localhost")) as client:
        client.ping()
    with Client(*b.address, tls=tls_options(certs, server_name="elsewhere.example",
                                            check_hostname=False)) as client:
        client.ping()


def test_a_server_with_a_certificate_of_another_ca_is_refused_by_the_client(start_broker, certs):
    b = start_broker("--tls-cert", certs.rogue_server_cert, "--tls-key", certs.rogue_server_key)
    with pytest.raises(ssl.SSLCertVerificationError):
        Client(*b.address, tls=tls_options(certs))


def test_mutual_tls_refuses_a_client_without_an_accepted_certificate_and_accepts_one_with(
        start_broker, certs, topic):
    b = tls_broker(start_broker, certs, "--tls-client-ca", certs.client_ca)
    with pytest.raises((ConnectionLost, ssl.SSLError)) as refused:
        Client(*b.address, tls=tls_options(certs))
    assert "CERTIFICATE_REQUIRED" in str(refused.value)
    with pytest.raises((ConnectionLost, ssl.SSLError)) as refused:
        Client(*b.address, tls=tls_options(certs, cert_file=certs.rogue_client_cert,
                                           key_file=certs.rogue_client_key))
    assert "UNKNOWN_CA" in str(refused.value)

    accepted = tls_options(certs, cert_file=certs.client_cert, key_file=certs.client_key)
    with Client(*b.address, tls=accepted) as client:
        round_trip(client, topic, count=20)

    async def accepted_async():
        client = await aio.AsyncClient.connect(*b.address, tls=accepted)
        async with client:
            await client.ping()
    asyncio.run(accepted_async())


def test_plain_tcp_to_a_tls_port_is_closed_without_harming_anything(start_broker, certs, topic):
    b = tls_broker(start_broker, certs, "--io-shards", "1")
    bystander = Client(*b.address, tls=tls_options(certs), heartbeat_ms=SLOW_HEARTBEAT)
    consumer = bystander.subscribe(topic, "s", "exclusive")
    before = sorted(b.processes())

    raw = RawConnection(*b.address)
    raw.send_frame({"op": "hello", "rid": 1, "version": 1, "client": "plain"})
    assert raw.expect_closed(timeout=5)
    raw.close()
    with pytest.raises((ConnectionLost, OSError)):
        Client(*b.address, connect_timeout=5)                  # the plain client library

    assert sorted(b.processes()) == before                     # nothing died, nothing was added
    producer = bystander.producer(topic)
    offset = producer.send_sync(b"still here")
    assert consumer.receive(timeout=5).id == offset
    with Client(*b.address, tls=tls_options(certs)) as client:
        client.ping()
    bystander.close()


def test_a_client_stalled_mid_handshake_blocks_no_one_and_is_closed_at_the_hello_deadline(
        start_broker, certs, topic):
    """One shard holds every connection: a handshake that waited for its client would hold up
    the others. Stalled: one sends nothing, one half a ClientHello, one a whole ClientHello and
    then nothing (the broker answered it)."""
    b = tls_broker(start_broker, certs, "--io-shards", "1")
    wait_for(lambda: processes_of_kind(b, "ab-shard"), lambda pids: len(pids) == 1)
    hello = bytes(TlsConnection(ssl.create_default_context(cafile=certs.ca), server_side=False,
                                server_hostname="localhost").outgoing)
    processes = sorted(b.processes())
    stalled = [socket.create_connection(b.address) for _ in range(3)]
    stalled[1].sendall(hello[:len(hello) // 2])
    stalled[2].sendall(hello)
    answer = stalled[2].recv(65536)
    assert answer[:1] == b"\x16"          # a TLS handshake record: the shard answered and moved on

    assert sorted(b.processes()) == processes      # they cost no process

    with Client(*b.address, tls=tls_options(certs)) as client:
        round_trip(client, topic, count=50)
    assert all(still_open(sock) for sock in stalled)   # the round trip did not wait for their end

    for sock in stalled:
        sock.settimeout(HELLO_DEADLINE_S + 10)
        while sock.recv(65536):           # what was in flight, then EOF: closed by the broker
            pass
        sock.close()


def still_open(sock):
    """Whether the broker has not closed `sock` (what it sent meanwhile is read and dropped)."""
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
        return False
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)


# --- supervision over TLS ---------------------------------------------------------------------------

def test_kill_of_a_shard_during_tls_traffic_removes_its_consumers_as_for_plain_tcp(
        start_broker, certs, topic):
    b = tls_broker(start_broker, certs, "--io-shards", "1", "--heartbeat-ms", str(SLOW_HEARTBEAT))
    options = dict(tls=tls_options(certs), heartbeat_ms=SLOW_HEARTBEAT)
    consumer_client = Client(*b.address, name="holder", **options)
    held = consumer_client.subscribe(topic, "rs", "shared", "holder", dispatch="reliable")
    producer_client = Client(*b.address, name="producer", **options)
    producer = producer_client.producer(topic)
    receipted, stop = [], threading.Event()

    def produce():
        n = 0
        while not stop.is_set():
            try:
                producer.send_sync(b"p%d" % n, timeout=10)
            except (ConnectionLost, BrokerError, TimeoutError):
                return
            receipted.append(b"p%d" % n)
            n += 1

    traffic = threading.Thread(target=produce, daemon=True)
    traffic.start()
    got = [held.receive(timeout=10) for _ in range(20)]     # delivered, never acknowledged
    assert len(got) == 20

    shard = wait_for(lambda: processes_of_kind(b, "ab-shard"), lambda pids: len(pids) == 1)[0]
    os.kill(shard, 9)
    wait_for(lambda: consumer_client.connected or producer_client.connected, lambda alive: not alive)
    stop.set()
    traffic.join(timeout=15)

    admin = connect_when_ready(b, **options)                # served by the restarted shard
    stats = wait_for(lambda: admin.stats(topic), lambda s: consumers_of(s, "rs") == [])
    assert [sub["name"] for sub in stats["subscriptions"]] == ["rs"]   # durable: it stays
    again = admin.subscribe(topic, "rs", "shared", "newcomer")
    redelivered = set()
    while not set(receipted) <= redelivered:
        msg = again.receive(timeout=10)
        redelivered.add(msg.payload)
        again.ack(msg)
    admin.close()
    consumer_client.close()
    producer_client.close()


# --- tokens over plain TCP on a non-loopback listener ----------------------------------------------

def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def outside_address():
    """(command prefix, address): a network namespace whose veth end has a private address, which
    this process reaches from outside over the veth pair; removed at the end."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and the ip command to make a network namespace")
    name = f"abtls{os.getpid()}"
    used = ip("-o", "addr").stdout
    for _ in range(50):
        net = ipaddress.ip_network(f"10.254.{random.randrange(256)}.{4 * random.randrange(64)}/30")
        ours, theirs = (str(a) for a in list(net.hosts()))
        if ours not in used and theirs not in used:
            break
    try:
        ip("netns", "add", name)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"network namespaces are not available: {exc.stderr.strip()}")
    try:
        ip("link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b")
        ip("link", "set", f"{name}b", "netns", name)
        ip("addr", "add", f"{ours}/30", "dev", f"{name}a")
        ip("link", "set", f"{name}a", "up")
        ip("-n", name, "addr", "add", f"{theirs}/30", "dev", f"{name}b")
        ip("-n", name, "link", "set", f"{name}b", "up")
        ip("-n", name, "link", "set", "lo", "up")     # the broker's own actor sockets are on loopback
        yield ("ip", "netns", "exec", name), theirs
    finally:
        ip("netns", "del", name, check=False)
        ip("link", "del", f"{name}a", check=False)     # gone with the namespace, or else now


@pytest.fixture
def auth_file(tmp_path):
    path = tmp_path / "auth.json"
    path.write_text('{"secret-token": ["admin"]}')
    return str(path)


def test_a_token_over_plain_tcp_to_a_non_loopback_listener_gets_auth_failed(
        start_broker, outside_address, auth_file):
    prefix, address = outside_address
    b = start_broker("--host", address, "--auth-file", auth_file, prefix=prefix)
    assert b.host == address
    conn = RawConnection(*b.address)
    reply = conn.request({"op": "hello", "version": 1, "client": "t", "token": "secret-token"},
                         expect_error=True)
    assert (reply["code"], reply["rid"]) == ("AUTH_FAILED", conn.last_rid)
    assert "plain TCP" in reply["message"] and "--allow-plain-tokens" in reply["message"]
    assert conn.expect_closed()
    conn.close()
    with pytest.raises(AuthFailed, match="plain TCP"):
        Client(*b.address, token="secret-token")


@pytest.mark.parametrize("how", ["allowed", "tls"])
def test_a_token_to_a_non_loopback_listener_is_taken_over_tls_or_when_allowed(
        start_broker, outside_address, auth_file, certs, how, topic):
    prefix, address = outside_address
    if how == "allowed":
        b = start_broker("--host", address, "--auth-file", auth_file, "--allow-plain-tokens", prefix=prefix)
        options = {}
    else:
        b = tls_broker(start_broker, certs, "--host", address, "--auth-file", auth_file, prefix=prefix)
        options = dict(tls=tls_options(certs, server_name="localhost"))
    with Client(*b.address, token="secret-token", **options) as client:
        assert client.producer(topic).send_sync(b"in") == 0
        assert client.topics()
    with pytest.raises(AuthFailed, match="missing or wrong token"):
        Client(*b.address, token="wrong", **options)
