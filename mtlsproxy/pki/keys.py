"""Key types the CA issues, and the one place that knows how each one signs."""

from __future__ import annotations

from typing import Literal, get_args

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from mtlsproxy.pem import PrivateKey

KeyType = Literal["ecdsa-p256", "ed25519", "rsa-2048"]
KEY_TYPES: tuple[str, ...] = get_args(KeyType)


def generate_key(key_type: KeyType) -> PrivateKey:
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")


def signature_hash(signing_key: PrivateKey) -> hashes.SHA256 | None:
    """Ed25519 hashes internally and takes no separate digest; the others sign SHA-256."""
    return None if isinstance(signing_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
