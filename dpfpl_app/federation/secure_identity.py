"""A node's signing identity for secure aggregation, from its node config.

Node config (set by the organisation when it starts its SuperNode, never by the run):

``secagg-signing-key``
    Path of the organisation's long-term private key: the SuperNode's own node-auth
    key (``--auth-supernode-private-key``), so nothing new has to be made or guarded.
``secagg-registry``
    A directory of ``*.pub`` files (or one file of OpenSSH public-key lines): the
    public keys of every registered organisation, given to each node out of band,
    exactly like the keys the SuperLink operator registers with
    ``flwr supernode register``. The server cannot add to it.
``secagg-require-signed``
    ``true``: refuse any secure round unless both of the above are set (a node that
    must never run the honest-server protocol by misconfiguration).

With both keys set, every secure round this node joins is the malicious-server variant
(``secagg.client``). Without them it is the honest-but-curious protocol, and the node
logs that its input's protection then assumes an honest server.
"""

from __future__ import annotations

from flwr.app import Context

from dpfpl_app.secagg.signing import Identity, KeyFileError, Registry, SigningKey, session_id

SIGNING_KEY = "secagg-signing-key"
REGISTRY = "secagg-registry"
REQUIRE_SIGNED = "secagg-require-signed"

UNSIGNED_WARNING = (
    f"secure aggregation WITHOUT signatures (node config {SIGNING_KEY} / {REGISTRY}"
    " not set): this node's input is hidden only from an honest-but-curious server;"
    " a server that substitutes its neighbours' keys can unmask it. Set both to the"
    " SuperNode's node-auth key and the registered organisations' public keys to"
    " refuse such a server."
)


class IdentityConfigError(ValueError):
    """Node config for signed rounds that is incomplete, unreadable or contradictory."""


def _flag(context: Context, key: str) -> bool:
    value = str(context.node_config.get(key, "false")).lower()
    if value not in ("true", "false"):
        raise IdentityConfigError(f"node config {key}={value!r}: use true or false")
    return value == "true"


def node_identity(context: Context, purpose: str) -> Identity | None:
    """The node's identity for a round of ``purpose`` in this run, or None (unsigned).

    Raises ``IdentityConfigError`` (the node then drops out of the round) when only one
    of the two paths is set, a file cannot be used, or signed rounds are required but
    not configured.
    """
    key_path = context.node_config.get(SIGNING_KEY)
    registry_path = context.node_config.get(REGISTRY)
    if not key_path and not registry_path:
        if _flag(context, REQUIRE_SIGNED):
            raise IdentityConfigError(
                f"node config {REQUIRE_SIGNED}=true but {SIGNING_KEY} and {REGISTRY} are not"
                " set: this node refuses unsigned secure rounds"
            )
        return None
    if not key_path or not registry_path:
        missing = REGISTRY if key_path else SIGNING_KEY
        raise IdentityConfigError(
            f"node config sets only one of {SIGNING_KEY} and {REGISTRY}: set {missing} too"
        )
    try:
        return Identity(
            SigningKey.from_file(str(key_path)),
            Registry.from_path(str(registry_path)),
            session_id(context.run_id, purpose),
        )
    except KeyFileError as exc:
        raise IdentityConfigError(f"signed secure aggregation: {exc}") from None
