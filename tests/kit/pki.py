"""Certificates for the mutual-TLS tests (trustme): a CA, the server's certificate, a client
certificate it issued and a rogue one from another CA.

API
    write_pki(directory) -> {"ca", "cert", "key", "client", "rogue": Path}
        ca: the CA bundle (tls.client_ca); cert/key: the server's (tls.cert, tls.key, for
        "mx.test" and 127.0.0.1); client: a client's key and chain from that CA (verified);
        rogue: one from another CA (refused).
"""

from __future__ import annotations

from pathlib import Path

import trustme


def write_pki(d: Path) -> dict[str, Path]:
    ca, other_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("mx.test", "127.0.0.1")
    client = ca.issue_cert("client.good.test")
    rogue = other_ca.issue_cert("client.rogue.test")
    out = {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key",
           "client": d / "client.pem", "rogue": d / "rogue.pem"}
    ca.cert_pem.write_to_path(str(out["ca"]))
    server.cert_chain_pems[0].write_to_path(str(out["cert"]))
    server.private_key_pem.write_to_path(str(out["key"]))
    client.private_key_and_cert_chain_pem.write_to_path(str(out["client"]))
    rogue.private_key_and_cert_chain_pem.write_to_path(str(out["rogue"]))
    return out
