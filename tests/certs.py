"""Certificates for the TLS tests, made with the `openssl` command (EC P-256: fast to make).

    certs = make_certs(directory)     # or None when openssl is not on PATH

A server CA signs the broker's certificate (names: localhost, 127.0.0.1 and any extra IPs);
a client CA signs a client certificate (mutual TLS); a third, untrusted CA signs a server and a
client certificate that nobody should accept.
"""
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
DAYS = ["-days", "2"]


@dataclass(frozen=True)
class Certs:
    ca: str                  # trusts server_cert
    server_cert: str
    server_key: str
    client_ca: str           # trusts client_cert
    client_cert: str
    client_key: str
    rogue_ca: str            # signed rogue_* only
    rogue_server_cert: str
    rogue_server_key: str
    rogue_client_cert: str
    rogue_client_key: str


def openssl_available():
    return shutil.which("openssl") is not None


def make_certs(directory, server_ips=()):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "server-ca")
    client_ca = _ca(directory, "client-ca")
    rogue_ca = _ca(directory, "rogue-ca")
    names = ["DNS:localhost", "IP:127.0.0.1"] + [f"IP:{ip}" for ip in server_ips]
    server = _leaf(directory, "server", ca, "serverAuth", names)
    client = _leaf(directory, "client", client_ca, "clientAuth", [])
    rogue_server = _leaf(directory, "rogue-server", rogue_ca, "serverAuth", names)
    rogue_client = _leaf(directory, "rogue-client", rogue_ca, "clientAuth", [])
    return Certs(ca[0], *server, client_ca[0], *client, rogue_ca[0], *rogue_server, *rogue_client)


def _run(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _ca(directory, name):
    cert, key = str(directory / f"{name}.pem"), str(directory / f"{name}.key")
    _run("req", "-x509", *CURVE, *DAYS, "-keyout", key, "-out", cert, "-subj", f"/CN={name}",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _leaf(directory, name, ca, usage, alt_names):
    cert, key, csr = (str(directory / f"{name}.{ext}") for ext in ("pem", "key", "csr"))
    ext = directory / f"{name}.ext"
    lines = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature",
             f"extendedKeyUsage={usage}", "subjectKeyIdentifier=hash", "authorityKeyIdentifier=keyid"]
    if alt_names:
        lines.append("subjectAltName=" + ",".join(alt_names))
    ext.write_text("\n".join(lines) + "\n")
    _run("req", *CURVE, "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    _run("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial", *DAYS,
         "-out", cert, "-extfile", str(ext))
    return cert, key
