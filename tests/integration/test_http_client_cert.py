"""Client-certificate authentication of the REST API, as pyhandle's certificate mode uses it: a
TLS client certificate naming ``index:handle`` whose public key is that identity's HS_PUBKEY.
The node asks for an optional client certificate chained to its ``[tls] ca`` (the local CA
here); the identity record, not the CA, decides who the caller is."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from pyhandle.client.resthandleclient import RESTHandleClient

from tests.integration.conftest import Local


def client_certificate(local: Local, directory: Path, subject: str, key: Ed25519PrivateKey) -> tuple[Path, Path]:
    """(certificate, key) files: ``subject`` as the UID, signed by the local CA."""
    tls = local.state / "tls"
    ca = x509.load_pem_x509_certificate((tls / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((tls / "ca.key").read_bytes(), password=None)
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.USER_ID, subject)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path, key_path = directory / "client.pem", directory / "client.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_pyhandle_certificate_mode_writes_as_the_certificates_identity(local: Local, tmp_path: Path) -> None:
    cert, key = client_certificate(local, tmp_path, "300:88.100.1/ADMIN", local.signer().key)
    client = RESTHandleClient(local.base(), certificate_only=str(cert), private_key=str(key), HTTPS_verify=local.ca)
    handle = "88.100.1/CERT-0001"
    assert client.register_handle(handle, "https://example.com/cert", overwrite=False) == handle
    assert client.retrieve_handle_record(handle)["URL"] == "https://example.com/cert"
    client.delete_handle(handle)


def test_a_certificate_whose_key_is_not_the_identitys_is_refused(local: Local, tmp_path: Path) -> None:
    cert, key = client_certificate(local, tmp_path, "300:88.100.1/ADMIN", Ed25519PrivateKey.generate())
    headers = {"Authorization": 'Handle clientCert="true"', "Content-Type": "application/json"}
    body = '{"values":[{"index":1,"type":"URL","data":"x"}]}'
    refused = local.request(
        "PUT", "/api/handles/88.100.1/CERT-BAD", data=body, headers=headers, cert=(str(cert), str(key))
    )
    assert refused.status_code == 401 and "HS_PUBKEY" in refused.json()["message"]
    missing = local.request("PUT", "/api/handles/88.100.1/CERT-BAD", data=body, headers=headers)
    assert missing.status_code == 401 and "no client certificate" in missing.json()["message"]
    assert local.get("/api/handles/88.100.1/CERT-BAD").status_code == 404
