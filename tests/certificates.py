"""Certificates for the tests that run NATS over TLS."""

import shutil
import subprocess
from pathlib import Path

from duetserve.common import nats_auth


def make_certificate(directory: Path) -> nats_auth.TlsFiles:
    """A self-signed certificate for 127.0.0.1 and localhost, made with openssl."""
    openssl = shutil.which("openssl")
    assert openssl is not None, "the openssl command is needed to make a test certificate"
    cert, key = directory / "server.pem", directory / "server-key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=duet-test"),
            *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ],
        check=True,
        capture_output=True,
    )
    return nats_auth.TlsFiles(cert, key)
