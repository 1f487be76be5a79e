"""Key agreement, key derivation, share encryption and Shamir sharing, wrapped.

Flower's primitives (``flwr.common.secure_aggregation``) are reused where they fit:
``encrypt``/``decrypt`` (Fernet: AES-128-CBC + HMAC-SHA256, authenticated, so a
corrupted or misrouted share fails to decrypt instead of decrypting to garbage).
Shamir sharing is ours (``shamir``: Flower's is ~100x slower to reconstruct, see there).

Not reused: Flower's ``generate_shared_key`` takes NIST-curve (ECDH) keys and derives
one key with no context; here keys are X25519 (32-byte public keys, constant-time), and
every derived key is bound by HKDF to its purpose, the round id and the unordered pair
of node ids, so a key never serves two purposes, two rounds or two pairs.

Interpolation cannot tell a wrong share from a right one; callers check the result
against a commitment (the self-mask seed) or
the advertised public key (the mask key), see ``server``.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt

from . import shamir

KEY_BYTES = 32
SEED_BYTES = 32
MASK_PURPOSE = b"dpfpl-secagg/pairwise-mask"
SHARE_PURPOSE = b"dpfpl-secagg/share-encryption"
_RAW = serialization.Encoding.Raw


def new_key_pair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as (private raw bytes, public raw bytes)."""
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
    raw = private.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return raw, public


def public_of(private_raw: bytes) -> bytes:
    """The public key of a raw X25519 private key (checks a reconstructed mask key)."""
    private = X25519PrivateKey.from_private_bytes(private_raw)
    return private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def check_public_key(public_raw: bytes) -> None:
    """ValueError unless ``public_raw`` is a 32-byte X25519 public key."""
    if not isinstance(public_raw, bytes) or len(public_raw) != KEY_BYTES:
        raise ValueError(f"an X25519 public key has {KEY_BYTES} bytes")
    X25519PublicKey.from_public_bytes(public_raw)


def derive_key(
    private_raw: bytes, peer_public: bytes, purpose: bytes, round_id: bytes, a: int, b: int
) -> bytes:
    """A 32-byte key shared by nodes a and b: HKDF(X25519(sk, pk); purpose, round, {a, b}).

    Raises ValueError on a low-order peer key (the X25519 output would be all zero).
    """
    shared = X25519PrivateKey.from_private_bytes(private_raw).exchange(
        X25519PublicKey.from_public_bytes(peer_public)
    )
    lo, hi = sorted((a, b))
    info = purpose + round_id + lo.to_bytes(8, "little") + hi.to_bytes(8, "little")
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def seal(key: bytes, plaintext: bytes) -> bytes:
    """Authenticated encryption of a share bundle (Flower's Fernet wrapper)."""
    return encrypt(base64.urlsafe_b64encode(key), plaintext)


def open_sealed(key: bytes, ciphertext: bytes) -> bytes:
    """Inverse of ``seal``; ValueError if the ciphertext was altered or is not for this key."""
    try:
        return decrypt(base64.urlsafe_b64encode(key), ciphertext)
    except Exception as exc:  # Fernet raises InvalidToken; anything else is malformed input
        raise ValueError(f"share ciphertext does not authenticate ({type(exc).__name__})") from None


def split_secret(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shamir shares of a 32-byte ``secret``; share i (0-based) carries x-coordinate i + 1."""
    return shamir.split(secret, threshold, holders)


def join_secret(shares: list[bytes]) -> bytes:
    """Interpolate ``shares``; ValueError if they are malformed or inconsistent."""
    return shamir.combine(shares)


def commit(round_id: bytes, node: int, seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed (hiding: the seed has 256 random bits)."""
    return hashlib.sha256(
        b"dpfpl-secagg/self-mask" + round_id + node.to_bytes(8, "little") + seed
    ).digest()


def pack_share_bundle(src: int, dst: int, seed_share: bytes, key_share: bytes) -> bytes:
    """The plaintext one client encrypts to one neighbour: ids bind it to the pair."""
    return (
        src.to_bytes(8, "little")
        + dst.to_bytes(8, "little")
        + len(seed_share).to_bytes(4, "little")
        + seed_share
        + key_share
    )


def unpack_share_bundle(plaintext: bytes) -> tuple[int, int, bytes, bytes]:
    """Inverse of ``pack_share_bundle``: (src, dst, seed share, key share)."""
    if len(plaintext) < 20:
        raise ValueError("share bundle too short")
    split = 20 + int.from_bytes(plaintext[16:20], "little")
    return (
        int.from_bytes(plaintext[:8], "little"),
        int.from_bytes(plaintext[8:16], "little"),
        plaintext[20:split],
        plaintext[split:],
    )
