"""A test-only ServerApp: the real one, whose server cheats in its first secure round.

It plays the key-substitution attack of issue 28 (docs/secure-aggregation.md): in the
share-keys stage of the first secure round it answers for every node's neighbours with
X25519 keys of its own, forwarding the neighbours' real signatures. Against unsigned
clients this would let it decrypt both Shamir shares of each node and unmask its input;
signed clients must refuse the round before sharing anything. Later rounds are honest.

It is copied, with ``hostile_client.py``, into a throwaway copy of the project by the
deployment test; it is never part of the real app.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import WARNING
from typing import Any

from flwr.common.logger import log

import server_app as real
from dpfpl_app.secagg import ServerRound, crypto, wire

_honest_share_keys = ServerRound.share_keys
_cheated: list[bytes] = []  # round ids attacked (this process runs one ServerApp)


def _substituting_share_keys(
    self: ServerRound, replies: Mapping[int, Mapping[str, Any]]
) -> dict[int, dict[str, Any]]:
    out = _honest_share_keys(self, replies)
    if _cheated:
        return out
    _cheated.append(self.params.round_id)
    for node, payload in out.items():
        fake = [(crypto.new_key_pair(), crypto.new_key_pair()) for _ in payload[wire.PEERS]]
        payload[wire.PEER_PK_MASK] = [mask[1] for mask, _ in fake]
        payload[wire.PEER_PK_ENC] = [enc[1] for _, enc in fake]
        log(WARNING, "cheating server: substituted the keys of node %d's neighbours", node)
    return out


ServerRound.share_keys = _substituting_share_keys  # type: ignore[method-assign]
app = real.app
