"""Crafted DKIM key records for the key-limit tests (no RSA key generation needed).

rsa_public_key(n, e) / spki(n, e) -> DER (RFC 8017 RSAPublicKey / X.509 SubjectPublicKeyInfo)
modulus(bits, rng) -> an odd number of exactly `bits` bits
record(der) -> b"v=DKIM1; k=rsa; p=<base64>"
signing_key() -> (private key PEM, public key DER)   a real key pair, for signing
signing_record() -> (private key PEM, its DKIM record as str)   the same, ready for a TXT

The numbers are not products of two primes: nobody can sign with these keys, and that does not
matter to a test about the sizes a verifier accepts in a TXT record.
"""

from __future__ import annotations

import base64
import random


def der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + der_len(len(body)) + body


def der_int(v: int) -> bytes:
    return tlv(0x02, v.to_bytes(v.bit_length() // 8 + 1, "big"))   # leading 0: positive


RSA_ALG = tlv(0x30, tlv(0x06, bytes.fromhex("2a864886f70d010101")) + b"\x05\x00")


def rsa_public_key(n: int, e: int) -> bytes:
    return tlv(0x30, der_int(n) + der_int(e))


def spki(n: int, e: int) -> bytes:
    return tlv(0x30, RSA_ALG + tlv(0x03, b"\x00" + rsa_public_key(n, e)))


def modulus(bits: int, rng: random.Random) -> int:
    return rng.getrandbits(bits) | (1 << (bits - 1)) | 1


def record(der: bytes, extra: str = "") -> bytes:
    return f"v=DKIM1; k=rsa;{extra} p={base64.b64encode(der).decode()}".encode()


def signing_key() -> tuple[bytes, bytes]:
    """A real 2048-bit RSA key pair for signing test messages: (private key PEM, public key DER
    as SubjectPublicKeyInfo, for a DKIM record's p=)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    return pem, key.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)


def signing_record() -> tuple[bytes, str]:
    """signing_key() with its public key as the DKIM TXT record (str, for tests.kit.dnsserver)."""
    pem, pub = signing_key()
    return pem, record(pub).decode()
