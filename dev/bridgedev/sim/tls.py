"""A throwaway certificate authority for the local TLS simulators.

gRPC only attaches access-token call credentials to a secure channel, so a simulator of a
token-authenticated gateway has to speak TLS. :class:`TestCA` makes a private CA and a
server certificate for ``127.0.0.1`` and ``localhost``; the client trusts the CA through
its PEM bytes or a root-CA file written with :meth:`TestCA.write_ca`.

Needs the ``sim`` extra (``trustme``).
"""

from __future__ import annotations

import os
from pathlib import Path

import trustme

__all__ = ["SERVER_IDENTITIES", "TestCA"]

#: Names the server certificate is valid for.
SERVER_IDENTITIES: tuple[str, ...] = ("127.0.0.1", "localhost")


class TestCA:
    """A private CA and one server certificate issued by it.

    Every instance has its own key pair; nothing is written to disk unless asked.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, identities: tuple[str, ...] = SERVER_IDENTITIES) -> None:
        if not identities:
            raise ValueError("identities: the server certificate needs at least one name")
        self._ca = trustme.CA(organization_name="kaiko-bridge simulator")
        leaf = self._ca.issue_cert(*identities)
        self.identities: tuple[str, ...] = identities
        #: The CA certificate (what the client trusts).
        self.ca_pem: bytes = self._ca.cert_pem.bytes()
        #: The server certificate followed by its issuer chain.
        self.server_cert_chain_pem: bytes = b"".join(b.bytes() for b in leaf.cert_chain_pems)
        #: The server certificate's private key.
        self.server_key_pem: bytes = leaf.private_key_pem.bytes()

    def write_ca(self, path: str | os.PathLike[str]) -> Path:
        """Write the CA certificate (PEM) to ``path``, creating parent folders.

        Returns the path written. The file holds only the public certificate.
        """
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.ca_pem)
        return target
