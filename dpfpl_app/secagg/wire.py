"""Stage names, payload keys and the checks every received payload goes through.

A payload is a flat ``dict[str, value]`` whose values are ints, floats, bytes, lists
of those, or (only under ``MASKED``) one numpy array (uint32 for rings up to 2^32,
else uint64): everything a Flower ``ConfigRecord`` holds, plus one ``ArrayRecord``
entry. The strategy copies payloads into records and back; it never looks inside.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


class Stage:
    """The five client-facing stages, in order (also Flower message actions).

    ``CONSISTENCY`` is the malicious-server variant's round (Bonawitz et al. 2017 sec. 6):
    each survivor signs the survivor list it was shown before anyone reveals a share.
    """

    SETUP = "secagg_setup"
    SHARE_KEYS = "secagg_share_keys"
    COLLECT_MASKED = "secagg_collect_masked"
    CONSISTENCY = "secagg_consistency"
    UNMASK = "secagg_unmask"
    ORDER = (SETUP, SHARE_KEYS, COLLECT_MASKED, CONSISTENCY, UNMASK)


# server -> client
NEIGHBOURS = "neighbours"
PEERS = "peers"
PEER_PK_MASK = "peer-pk-mask"
PEER_PK_ENC = "peer-pk-enc"
SOURCES = "sources"
CIPHERTEXTS = "ciphertexts"
SURVIVORS = "survivors"
DROPPED = "dropped"
PEER_SIGNERS = "peer-signers"  # each peer's registered public key (b"" if it signs nothing)
PEER_SIGNATURES = "peer-signatures"
SIGNERS = "signers"  # survivors whose consistency signature is forwarded
SIGNER_KEYS = "signer-keys"
SIGNATURES = "signatures"
# client -> server
PK_MASK = "pk-mask"
PK_ENC = "pk-enc"
SEED_COMMIT = "seed-commit"
SIGNER = "signer"  # the node's registered public key, b"" in an unsigned round
SIGNATURE = "signature"  # over the advertisement (setup) or the survivor list (consistency)
DESTINATIONS = "destinations"
MASKED = "masked"
REJECTED = "rejected"
SEED_OWNERS = "seed-owners"
SEED_SHARES = "seed-shares"
KEY_OWNERS = "key-owners"
KEY_SHARES = "key-shares"

ARRAY_KEYS = frozenset({MASKED})  # everything else goes into a ConfigRecord


class PayloadError(ValueError):
    """A payload field missing or of the wrong type (the message says which)."""


def field(payload: Mapping[str, Any], key: str) -> Any:
    """``payload[key]`` or PayloadError naming the key."""
    if key not in payload:
        raise PayloadError(f"missing field {key!r}")
    return payload[key]


def id_list(payload: Mapping[str, Any], key: str) -> list[int]:
    """A list of distinct non-negative ints (node ids)."""
    value = field(payload, key)
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, int) and v >= 0 for v in value
    ):
        raise PayloadError(f"field {key!r} must be a list of node ids")
    if len(set(value)) != len(value):
        raise PayloadError(f"field {key!r} repeats a node id")
    return [int(v) for v in value]


def bytes_list(payload: Mapping[str, Any], key: str, length: int | None = None) -> list[bytes]:
    """A list of bytes, optionally all of ``length`` bytes."""
    value = field(payload, key)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, bytes) for v in value):
        raise PayloadError(f"field {key!r} must be a list of bytes")
    if length is not None and any(len(v) != length for v in value):
        raise PayloadError(f"field {key!r} must hold {length}-byte values")
    return list(value)


def bytes_field(payload: Mapping[str, Any], key: str, length: int) -> bytes:
    """A bytes value of exactly ``length`` bytes."""
    value = field(payload, key)
    if not isinstance(value, bytes) or len(value) != length:
        raise PayloadError(f"field {key!r} must be {length} bytes")
    return value


def optional_bytes(payload: Mapping[str, Any], key: str) -> bytes:
    """A bytes value, ``b""`` when absent (an unsigned node sends no signature)."""
    value = payload.get(key, b"")
    if not isinstance(value, bytes):
        raise PayloadError(f"field {key!r} must be bytes")
    return value


def ring_dtype(bits: int) -> np.dtype:
    """The wire dtype of ring elements: uint32 when they fit (half the bytes), else uint64."""
    return np.dtype(np.uint32) if bits <= 32 else np.dtype(np.uint64)


def ring_vector(payload: Mapping[str, Any], key: str, dim: int, bits: int) -> np.ndarray:
    """A length-``dim`` vector of residues mod 2^bits in ``ring_dtype(bits)``, as uint64."""
    value = field(payload, key)
    if not isinstance(value, np.ndarray) or value.ndim != 1:
        raise PayloadError(f"field {key!r} must be a 1-D numpy array")
    if value.shape[0] != dim:
        raise PayloadError(f"field {key!r} has length {value.shape[0]}, expected {dim}")
    if value.dtype != ring_dtype(bits):
        raise PayloadError(f"field {key!r} has dtype {value.dtype}, expected {ring_dtype(bits)}")
    if dim and int(value.max()) >= (1 << bits):
        raise PayloadError(f"field {key!r} has values outside Z_(2^{bits})")
    return value.astype(np.uint64)
