"""A throw-away certificate authority for the sandbox (and tests): TLS without openssl commands.

The sandbox's servers, rwproxy's backend TLS and its tests need a CA, a server
certificate naming 127.0.0.1/localhost and a client certificate (for accounts
created with REQUIRE X509). ECDSA P-256 keys: fast to make, and accepted by
MariaDB's OpenSSL and by Python's ssl module alike.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

FILES = ("ca.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rwproxy sandbox"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, data: bytes, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_authority(directory: str | os.PathLike, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                   days: int = 3650) -> dict[str, str]:
    """Write ca.pem, server-cert/key.pem and client-cert/key.pem into directory (kept if all exist).

    Returns {"ca": ..., "server_cert": ..., "server_key": ..., "client_cert": ..., "client_key": ...}.
    """
    d = Path(directory)
    paths = {f[:-4].replace("-", "_"): str(d / f) for f in FILES}
    if all((d / f).is_file() for f in FILES):
        return paths
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
    until = now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("rwproxy sandbox CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(common_name: str, usage: list, san: list | None):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now).not_valid_after(until)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage(usage), critical=False))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    san = []
    for h in hosts:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            san.append(x509.DNSName(h))
    # The server certificate may also act as a client: etcd's gateway dials its own gRPC port with it,
    # which --client-cert-auth refuses without clientAuth ("incompatible key usage").
    server_cert, server_key = leaf(hosts[0], [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], san)
    client_cert, client_key = leaf("rwproxy", [ExtendedKeyUsageOID.CLIENT_AUTH], None)
    _write(d / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    _write(d / "server-cert.pem", server_cert)
    _write(d / "server-key.pem", server_key, private=True)
    _write(d / "client-cert.pem", client_cert)
    _write(d / "client-key.pem", client_key, private=True)
    return paths
