"""Certificates and node keys for a dpsynth consortium (the `cryptography` package; no openssl needed).

  make_ca           a consortium CA (self-signed, EC P-256) — ca.pem, ca.key (0600)
  make_server_cert  the SuperLink's TLS certificate signed by the CA, with SANs for its host names / IPs
  make_node_key     a site's SuperNode authentication key pair: OpenSSH EC NIST P-256
                    (<name>.key private, 0600, created with O_EXCL; <name>.pub goes to the coordinator)

A hospital generates its node key itself (``python -m deploy node-key --out DIR --name site_a``) and sends
only the .pub file to the coordinator, who registers it (``flwr supernode register site_a.pub <superlink>``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write_private(path: Path, data: bytes) -> None:
    if path.exists():
        raise FileExistsError(f"{path} already exists: refusing to overwrite a private key")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(out: str | os.PathLike, *, name: str = "dpsynth consortium CA", days: int = 365) -> tuple[Path, Path]:
    out = Path(out)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(out / "ca.key", _pem_key(key))
    _write_public(out / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
    return out / "ca.pem", out / "ca.key"


def make_server_cert(out: str | os.PathLike, *, ca_cert: str | os.PathLike, ca_key: str | os.PathLike,
                     hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), name: str = "server",
                     days: int = 365) -> tuple[Path, Path]:
    out = Path(out)
    ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    ca_k = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_k.public_key()), critical=False)
        .sign(ca_k, hashes.SHA256())
    )
    _write_private(out / f"{name}.key", _pem_key(key))
    _write_public(out / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))
    return out / f"{name}.pem", out / f"{name}.key"


def make_node_key(out: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """OpenSSH EC NIST P-256 key pair for SuperNode authentication."""
    out = Path(out)
    key = ec.generate_private_key(ec.SECP256R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_private(out / f"{name}.key", priv)
    _write_public(out / f"{name}.pub", pub + f" dpsynth-{name}\n".encode())
    return out / f"{name}.key", out / f"{name}.pub"
