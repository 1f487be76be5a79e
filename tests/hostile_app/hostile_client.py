"""A test-only ClientApp that misbehaves on purpose, to show the server survives it.

It runs the real ``client_app`` (so the node trains and keeps its private state exactly
as in production) and then corrupts the train reply as the node config says. A node
started with ``--node-config "... hostile-modes='wrong-shape,extra-keys'"`` uses the
first mode in round 1, the second in round 2, and so on (the last mode repeats). A node
without ``hostile-modes`` is honest. The real ClientApp ignores that node-config key,
so the same SuperNodes can run the real app and this one.

Modes:

- ``honest``: the real reply, unchanged.
- ``wrong-shape``: the gradient without its last context row.
- ``extra-keys``: the real gradient plus this node's private local-prompt tensors
  (a client trying to push its local prompt to the server).
- ``non-finite``: the gradient with a NaN and an Inf in it.
- ``huge-norm``: the gradient times 1e6, as if the client skipped clipping.
- ``error``: raise, so Flower sends the server an error reply.
- ``secure-poison``: in a secure round, the masked input is the clipped gradient
  rescaled to ``POISON_CLIP_NORMS`` times the clip norm, the node skipping its own
  bound check (its quantiser is replaced for that message); honest in a plain round.

The secure-aggregation stages run the real handlers; only ``secure-poison`` changes
anything there.

This file is copied into a throwaway copy of the project by the tests; it is never
part of the real app.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

import client_app as real
from dpfpl_app.secagg import Stage, fixed_point

# ``dpfpl_app.federation.wire`` and ``client_node`` import torch: they are imported in the
# handlers that train, so that the key-exchange stages start as fast as the real app's
# (a slow start under load can outlast Flower's task heartbeat and be refused)

MODES_KEY = "hostile-modes"
HUGE_FACTOR = 1e6
POISON_CLIP_NORMS = 30.0  # inside 9dded1e's sum check at 3 nodes (~137 C), far outside ours

app = ClientApp()


def _mode(msg: Message, context: Context) -> str:
    from dpfpl_app.federation import wire

    modes = [m.strip() for m in str(context.node_config.get(MODES_KEY, "honest")).split(",")]
    server_round = int(msg.content[wire.CONFIG_RECORD][wire.SERVER_ROUND])
    return modes[min(server_round, len(modes)) - 1]


def _corrupt(grad: np.ndarray, mode: str, context: Context) -> dict[str, np.ndarray]:
    """The arrays a hostile reply carries instead of ``{global-prompt-grad: grad}``."""
    from dpfpl_app.federation import wire
    from dpfpl_app.federation.client_node import STATE_ARRAYS

    if mode == "wrong-shape":
        return {wire.GLOBAL_PROMPT_GRAD: grad[:-1].copy()}
    if mode == "non-finite":
        bad = grad.copy()
        bad.flat[0], bad.flat[1] = np.nan, np.inf
        return {wire.GLOBAL_PROMPT_GRAD: bad}
    if mode == "huge-norm":
        return {wire.GLOBAL_PROMPT_GRAD: grad * np.float32(HUGE_FACTOR)}
    if mode == "extra-keys":
        private = context.state[STATE_ARRAYS]  # what the real train just kept on the node
        leaked = {f"leaked-{key}": private[key].numpy() for key in private.keys()}
        return {wire.GLOBAL_PROMPT_GRAD: grad, **leaked}
    if mode in ("honest", "secure-poison"):
        return {wire.GLOBAL_PROMPT_GRAD: grad}
    raise ValueError(f"unknown {MODES_KEY} entry {mode!r}")


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train honestly, then reply as the node's hostile mode for this round says."""
    from dpfpl_app.federation import wire

    mode = _mode(msg, context)
    if mode == "error":
        raise RuntimeError("hostile client: deliberate failure in train")
    reply = real.train(msg, context)
    grad = reply.content[wire.ARRAYS_RECORD][wire.GLOBAL_PROMPT_GRAD].numpy()
    corrupted = _corrupt(grad, mode, context)
    arrays = {key: Array(np.ascontiguousarray(a)) for key, a in corrupted.items()}
    content = RecordDict(
        {
            wire.ARRAYS_RECORD: ArrayRecord(arrays),
            wire.METRICS_RECORD: reply.content[wire.METRICS_RECORD],
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluation stays honest: the point here is what reaches the global prompt."""
    return real.evaluate(msg, context)


# --- secure aggregation: the real stages, one of them poisoned on request --------------
for _stage, _handler in (
    (Stage.SETUP, real.secagg_setup),
    (Stage.SHARE_KEYS, real.secagg_share_keys),
    (Stage.CONSISTENCY, real.secagg_consistency),
    (Stage.UNMASK, real.secagg_unmask),
):
    app.query(_stage)(_handler)


@contextmanager
def _unchecked_quantiser() -> Iterator[None]:
    """The node's quantiser, minus its bound check, on an input of POISON_CLIP_NORMS C."""
    honest = fixed_point.quantise

    def poisoned(x, *, clip, scale, stream):  # type: ignore[no-untyped-def]
        direction = np.asarray(x, dtype=np.float64) / max(float(np.linalg.norm(x)), 1e-12)
        return honest(direction * clip, clip=clip, scale=scale * POISON_CLIP_NORMS, stream=stream)

    fixed_point.quantise = poisoned
    try:
        yield
    finally:
        fixed_point.quantise = honest


@app.train(Stage.COLLECT_MASKED)
def secagg_collect_masked(msg: Message, context: Context) -> Message:
    """The real masked stage; with ``secure-poison`` its input is far above the clip norm."""
    if _mode(msg, context) != "secure-poison":
        return real.secagg_collect_masked(msg, context)
    with _unchecked_quantiser():
        return real.secagg_collect_masked(msg, context)
