"""A fake GRID proxy for the tests: a real X.509 certificate and key made with `cryptography`.

>>> from proxies import write_proxy
>>> path = write_proxy(tmp_path / "x509up_u1000", hours=100)  # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import pytest

_KEY = re.compile(
    rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----\n?", re.S
)


def write_proxy(path: Path, hours: float | datetime.timedelta) -> Path:
    """Write a proxy-like PEM file (certificate, then its private key) valid for ``hours`` more.

    ``hours`` may be negative (an expired proxy) or a :class:`datetime.timedelta`. The file is
    made readable by its owner only, as ``voms-proxy-init`` does. Skips the test without
    ``cryptography`` (the test extra).
    """
    pytest.importorskip("cryptography", reason="pip install cryptography (the test extra)")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    valid_for = hours if isinstance(hours, datetime.timedelta) else datetime.timedelta(hours=hours)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cmsml test proxy")])
    now = datetime.datetime.now(datetime.timezone.utc)
    end = now + valid_for
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(min(now, end) - datetime.timedelta(days=10))
        .not_valid_after(end)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def proxy_key_pem(path: Path) -> bytes:
    """The private-key block of a proxy file written by :func:`write_proxy`."""
    found = _KEY.search(Path(path).read_bytes())
    assert found is not None, f"{path} holds no private key"
    return found.group(0)
