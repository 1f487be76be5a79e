"""Stage payloads in Flower records, and the message type of each stage.

A payload (``wire``) becomes two records of a message: its plain fields in a
``ConfigRecord`` and its ring vector (``wire.ARRAY_KEYS``) in an ``ArrayRecord``. The
key-exchange stages are queries; the masked-input stage is a training message (the
client trains to produce its input). Flower routes ``"<category>.<action>"`` to the
handler registered with ``@app.<category>(action)``; stage names are valid actions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, RecordDict

from .wire import ARRAY_KEYS, Stage

PAYLOAD_CONFIG = "secagg"
PAYLOAD_ARRAYS = "secagg-arrays"
PURPOSE = "secagg-purpose"  # what the sum is for: a client derives the round's config from it

CATEGORY = {
    Stage.SETUP: MessageType.QUERY,
    Stage.SHARE_KEYS: MessageType.QUERY,
    Stage.COLLECT_MASKED: MessageType.TRAIN,
    Stage.CONSISTENCY: MessageType.QUERY,
    Stage.UNMASK: MessageType.QUERY,
}


def message_type(stage: str) -> str:
    """The Flower message type of a stage, e.g. ``"query.secagg_setup"``."""
    return message_type_for(stage, CATEGORY[stage])


def message_type_for(stage: str, category: str) -> str:
    """A stage sent under another category (a masked stage that trains nothing is a query)."""
    return f"{category}.{stage}"


def add_purpose(content: RecordDict, purpose: str) -> RecordDict:
    """Tag ``content`` (in place) with the purpose of the round it belongs to."""
    content[PURPOSE] = ConfigRecord({"purpose": purpose})
    return content


def read_purpose(content: RecordDict, default: str) -> str:
    """The purpose a message states; ``default`` for a message that states none."""
    if PURPOSE not in content:
        return default
    return str(content.config_records[PURPOSE]["purpose"])


def add_payload(content: RecordDict, payload: Mapping[str, Any]) -> RecordDict:
    """Put ``payload`` into ``content`` (in place) and return it."""
    content[PAYLOAD_CONFIG] = ConfigRecord(
        {k: v for k, v in payload.items() if k not in ARRAY_KEYS}
    )
    content[PAYLOAD_ARRAYS] = ArrayRecord(
        {k: Array(v) for k, v in payload.items() if k in ARRAY_KEYS}
    )
    return content


def read_payload(content: RecordDict) -> dict[str, Any]:
    """The payload carried by a message; KeyError names a missing record."""
    for name in (PAYLOAD_CONFIG, PAYLOAD_ARRAYS):
        if name not in content:
            raise KeyError(f"message has no {name!r} record: not a secure-aggregation message")
    out: dict[str, Any] = dict(content.config_records[PAYLOAD_CONFIG])
    out.update({k: a.numpy() for k, a in content.array_records[PAYLOAD_ARRAYS].items()})
    return out
