"""Long-term signing keys: what makes a key advertisement the server cannot forge.

Without signatures a malicious server can answer for a client's neighbours with X25519
keys of its own, decrypt both kinds of Shamir share of that client and unmask its
individual input. Here every organisation signs its round keys (and, before any share
is revealed, the survivor list) with a long-term key the server never holds: by default
the SuperNode's own node-authentication key pair (an OpenSSH ECDSA key, the kind
``flwr supernode register`` takes; Ed25519 keys work too). Every client checks each
signature against the set of registered organisations' public keys, which each node
holds itself: fixed out of band, exactly as node registration is. The server only
forwards signatures and signer keys; it needs no registry.

What is signed is domain-separated and bound to the session (run and round purpose),
the round id and the signer's node id, so no signature serves two messages.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

_ADVERT = b"dpfpl-secagg/key-advertisement\x00"
_SURVIVORS = b"dpfpl-secagg/survivor-list\x00"
_OPENSSH = (serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
PrivateKey = ec.EllipticCurvePrivateKey | Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | Ed25519PublicKey


class KeyFileError(ValueError):
    """A signing key or registry file that cannot be used (the message says which and why)."""


def _hash_for(curve: ec.EllipticCurve) -> hashes.HashAlgorithm:
    """ECDSA hash matched to the curve's strength (SHA-256 up to P-256, then SHA-384/512)."""
    if curve.key_size <= 256:
        return hashes.SHA256()
    return hashes.SHA384() if curve.key_size <= 384 else hashes.SHA512()


def public_bytes(key: PublicKey) -> bytes:
    """The canonical wire form of a public key: its OpenSSH line without a comment."""
    return key.public_bytes(*_OPENSSH)


def _check_type(key: object, path: Path) -> None:
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey,
                            Ed25519PrivateKey, Ed25519PublicKey)):  # fmt: skip
        raise KeyFileError(
            f"{path}: a {type(key).__name__} cannot sign secure-aggregation rounds;"
            " use the SuperNode's ECDSA node-auth key (scripts/make-certs.sh node) or Ed25519"
        )


class SigningKey:
    """One organisation's long-term private key (never leaves the node)."""

    def __init__(self, private: PrivateKey) -> None:
        self._private = private
        self.public = public_bytes(private.public_key())

    @classmethod
    def from_file(cls, path: str | Path) -> SigningKey:
        """Load an OpenSSH or PEM private key (unencrypted: the SuperNode's own key file)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"cannot read the signing key {path}: {exc.strerror}") from None
        key: object
        try:
            if b"OPENSSH PRIVATE KEY" in data:
                key = serialization.load_ssh_private_key(data, password=None)
            else:
                key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{path} is not an unencrypted private key: {exc}") from None
        _check_type(key, path)
        return cls(key)  # type: ignore[arg-type]

    def sign(self, message: bytes) -> bytes:
        """A signature of ``message`` (ECDSA with the curve's hash, or Ed25519)."""
        if isinstance(self._private, Ed25519PrivateKey):
            return self._private.sign(message)
        return self._private.sign(message, ec.ECDSA(_hash_for(self._private.curve)))


class Registry:
    """The registered organisations' public keys, as this node was given them."""

    def __init__(self, keys: Iterable[PublicKey]) -> None:
        self._keys = {public_bytes(k): k for k in keys}
        if not self._keys:
            raise KeyFileError("the registry of organisations' keys is empty")

    @classmethod
    def from_path(cls, path: str | Path) -> Registry:
        """A directory of ``*.pub`` files, or one file of OpenSSH public-key lines."""
        path = Path(path)
        files = sorted(path.glob("*.pub")) if path.is_dir() else [path]
        keys = []
        for file in files:
            try:
                lines = file.read_text().splitlines()
            except OSError as exc:
                raise KeyFileError(f"cannot read registered keys {file}: {exc.strerror}") from None
            for number, line in enumerate(lines, 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                try:
                    key = serialization.load_ssh_public_key(line.strip().encode())
                except (ValueError, TypeError, AttributeError) as exc:
                    raise KeyFileError(
                        f"{file}:{number} is not an OpenSSH public key: {exc}"
                    ) from None
                _check_type(key, file)
                keys.append(key)
        if not keys:
            raise KeyFileError(f"no public keys in {path} (a directory of *.pub files or a file)")
        return cls(keys)  # type: ignore[arg-type]

    def __contains__(self, public: object) -> bool:
        return isinstance(public, bytes) and public in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, public: bytes, message: bytes, signature: bytes) -> bool:
        """Whether ``public`` is registered and signed ``message`` with ``signature``."""
        key = self._keys.get(public)
        if key is None or not signature:
            return False
        try:
            if isinstance(key, Ed25519PublicKey):
                key.verify(signature, message)
            else:
                key.verify(signature, message, ec.ECDSA(_hash_for(key.curve)))
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True)
class Identity:
    """What a node signs and verifies with: its key, the registry and the session.

    ``session`` binds every signature to one run and one purpose of secure sum (the
    caller builds it, ``session_id``), on top of the round id the server picks.
    """

    key: SigningKey
    registry: Registry
    session: bytes

    def __post_init__(self) -> None:
        if self.key.public not in self.registry:
            raise KeyFileError(
                "this node's own public key is not in its registry of organisations:"
                " the key file and the registry do not belong together"
            )


def session_id(run_id: int, purpose: str) -> bytes:
    """A fixed-length id of (run, purpose) for the signed messages."""
    return hashlib.sha256(f"{int(run_id)}\x00{purpose}".encode()).digest()


def _ids(nodes: Sequence[int]) -> bytes:
    return len(nodes).to_bytes(4, "little") + b"".join(int(v).to_bytes(8, "little") for v in nodes)


def advert_message(
    session: bytes, round_id: bytes, node: int, pk_mask: bytes, pk_enc: bytes
) -> bytes:
    """What a node signs when it advertises its two round keys."""
    return _ADVERT + session + round_id + _ids([node]) + pk_mask + pk_enc


def survivors_message(
    session: bytes, round_id: bytes, node: int, survivors: Sequence[int]
) -> bytes:
    """What a node signs in the consistency stage: the survivor list it was shown."""
    return _SURVIVORS + session + round_id + _ids([node]) + _ids(sorted(survivors))
