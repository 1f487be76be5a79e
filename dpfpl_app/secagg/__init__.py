"""Secure aggregation (SecAgg+) with distributed Skellam DP, as plain-data stage functions.

The server learns only the noised SUM of the clients' clipped vectors: each client
quantises its input, adds its share of the DP noise (Skellam, ``skellam``), and masks it
with a self-mask and pairwise masks that cancel in the sum (Bonawitz et al. 2017) over
a sparse neighbour graph (SecAgg+, Bell et al. 2020). Shamir shares of the mask secrets
let the server remove the masks of clients that drop out, and only those.

This package imports numpy, ``cryptography`` and ``flwr.common.secure_aggregation``,
never torch: in deployment every message starts a fresh ClientApp process, and the
key-exchange stages must not pay for torch or CLIP.

Public API
----------
``SecAggConfig(dim, clip, sum_noise_std=0.0, l2_sensitivity=None, scale=None, degree=None,
threshold=None, min_survivors=None, wrap_probability=2**-40)``
    The operator's choices; the same on the server and every client (from the run
    config). Rules for the derived values: ``params`` module docstring.

``ServerRound(config, node_ids, *, round_id=None, verify_all_shares=True)``, in order::

    out = server.setup()                       # {node: payload} for Stage.SETUP
    out = server.share_keys(replies)           # replies of SETUP   -> payloads for SHARE_KEYS
    out = server.collect_masked(replies)       # replies of SHARE_KEYS -> COLLECT_MASKED
    out = server.survivor_list(replies)        # replies of COLLECT_MASKED -> CONSISTENCY
                                               #   (signed round) or UNMASK (unsigned)
    out = server.unmask(replies)               # signed only: replies of CONSISTENCY -> UNMASK
    result = server.finish(replies)            # replies of UNMASK  -> AggregateResult

    or, not knowing whether the round is signed: ``out = server.setup()``, then
    ``out = server.receive(replies)`` with the replies of ``server.pending``'s stage
    until ``server.pending == "done"`` (``out`` is then the ``AggregateResult``).

    ``replies`` is ``{node_id: payload}`` of the nodes that answered (leave out error
    replies and timeouts: they are dropouts). Any stage may raise ``SecAggAbort(stage,
    reason)``: the round releases nothing and costs no privacy budget. Protocol
    violations that the round survives are in ``server.faults`` / ``result.faults``
    (``Fault(node, stage, reason)``).

``ClientRound(config, node_id, identity=None)`` / ``ClientRound.from_state(config,
node_id, state, identity=None)``::

    reply = client.setup(payload)                     # Stage.SETUP
    reply = client.share_keys(payload)                # Stage.SHARE_KEYS
    reply = client.collect_masked(payload, vector)    # Stage.COLLECT_MASKED (clipped floats)
    reply = client.consistency(payload)               # Stage.CONSISTENCY (signed rounds)
    reply = client.unmask(payload)                    # Stage.UNMASK (then the state is empty)

    ``identity`` (``signing.Identity``: the organisation's long-term key, the registry
    of organisations' public keys, the session) makes the round the malicious-server
    variant; without it the round trusts the server to relay keys faithfully.
    state = client.to_state()                         # store in context.state between stages

    A stage that cannot go on raises ``SecAggAbort``; an input of L2 norm above
    ``clip`` (or non-finite) raises ``InputOutOfBound`` before anything is computed
    from it. Either way the ClientApp should answer with an error reply.

``AggregateResult``: ``total`` (float64 sum), ``integer_total``, ``survivors``, ``dropped``,
``faults``, ``params``; ``result.rdp(orders, l2_sensitivity)`` is the RDP curve of this
release at the ACTUAL number of survivors, to add to an opacus RDP history;
``dp.rdp_to_epsilon`` converts. ``subsampled.poisson_subsampled_rdp(base, orders, q)``
amplifies any RDP curve by Poisson subsampling (a generic bound, Zhu and Wang 2019).

Security model (``docs/secure-aggregation.md``): with identities on every node (signed
rounds), a server that deviates arbitrarily (substitutes keys, lies about dropouts or
survivors, forges lists) together with fewer than t colluding clients learns nothing
about an honest client's input beyond a noised sum of at least ``min_survivors``
inputs; the remaining assumption is that the set of organisations (their registered
keys) is fixed out of band, as node registration is. Without identities the same holds
only against an honest-but-curious server: a server that answers for a client's
neighbours with its own keys can unmask that client's input. Colluding clients can
subtract their own noise: against c colluders the DP guarantee is that of the other
m - c survivors' noise (``DistributedSkellam.rdp(orders, m - c)``).

Driving it from a Flower strategy: one ``ServerRound`` per training round; each stage
is one ``grid.send_and_receive`` of ``Message(RecordDict({...}), node_id,
f"train.{stage}")`` (or ``"query.{stage}"`` for the key-exchange stages); the ClientApp
registers one handler per stage with ``@app.train(Stage.SETUP)`` etc. (Flower routes
``"<category>.<action>"`` to the handler registered under that action; the action must
be a Python identifier). Replies with ``msg.has_error()`` are dropouts: leave them out.

Payloads are flat dicts of ints, floats, bytes and lists of those (a Flower
``ConfigRecord``), except ``wire.MASKED``, a numpy array of ``wire.ring_dtype(bits)``
(uint32 up to a 2^32 ring, else uint64; an ``ArrayRecord`` entry); ``wire.ARRAY_KEYS``
lists the array keys. Client state is a flat dict of the same plain types. Stage names
(``wire.Stage``) are valid Flower message actions.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import ClientRound
    from .dp import DistributedSkellam, rdp_to_epsilon, skellam_rdp
    from .errors import InputOutOfBound, SecAggAbort
    from .params import RoundParams, SecAggConfig
    from .server import AggregateResult, Fault, ServerRound
    from .signing import Identity, Registry, SigningKey
    from .wire import ARRAY_KEYS, Stage

# Each public name and the module that defines it, imported on first use: the ClientApp
# process Flower starts for every message needs ``Stage`` to register its handlers, and
# importing the protocol and its cryptography there would cost every message (node
# worker or not) a fraction of a second for nothing.
_HOMES = {
    "ClientRound": "client",
    "DistributedSkellam": "dp", "rdp_to_epsilon": "dp", "skellam_rdp": "dp",
    "InputOutOfBound": "errors", "SecAggAbort": "errors",
    "RoundParams": "params", "SecAggConfig": "params",
    "AggregateResult": "server", "Fault": "server", "ServerRound": "server",
    "Identity": "signing", "Registry": "signing", "SigningKey": "signing",
    "ARRAY_KEYS": "wire", "Stage": "wire",
}

__all__ = [  # the same names as _HOMES (tests/test_secagg_imports.py)
    "ARRAY_KEYS",
    "AggregateResult",
    "ClientRound",
    "DistributedSkellam",
    "Fault",
    "Identity",
    "InputOutOfBound",
    "Registry",
    "RoundParams",
    "SecAggAbort",
    "SecAggConfig",
    "ServerRound",
    "SigningKey",
    "Stage",
    "rdp_to_epsilon",
    "skellam_rdp",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value
