"""The sampling rate a node declares: how to pick it, and when it does not fit the data.

A node's Poisson rate must be fixed before its data is read (``dp_channel`` says why).
The rate that spends the budget well is about B / |D_i| (expected batch B, the public
divisor of every sum): lower, the batches are smaller than B and the updates are damped;
higher, each step sees more records than B and the node's epsilon is that of the higher
rate (more privacy spent per step). Either way the accounting holds: it uses the
declared rate, never the dataset size. These helpers are pure
arithmetic, shared by the node (which logs a mismatch, never sends it) and the
``dpfpl sample-rate`` command (which suggests a rate from a size the operator gives).
"""

from __future__ import annotations

MISMATCH_FACTOR = 2.0
"""A declared rate whose expected batch q |D_i| is outside [B / 2, 2 B] is reported."""


def matching_rate(batch_size: int, num_train: int, bound: float = 1.0) -> float:
    """The rate whose expected batch is B on ``num_train`` records, capped at ``bound``."""
    if num_train < 1:
        raise ValueError(f"a node needs training records to sample from, got {num_train}")
    return min(bound, batch_size / num_train)


def rate_mismatch(rate: float, batch_size: int, num_train: int) -> str | None:
    """A warning for the node's log when ``rate x |D_i|`` is far from B, else None.

    Node-local only: the size of the dataset is private, so is this message.
    """
    expected = rate * num_train
    effect = (
        "the updates are damped"
        if expected < batch_size
        else "each step spends more privacy than a batch of B needs"
    )
    if batch_size / MISMATCH_FACTOR <= expected <= MISMATCH_FACTOR * batch_size:
        return None
    return (
        f"declared sample rate {rate:g} draws {expected:.1f} of {num_train} training records "
        f"per step on average, but sums are divided by batch-size {batch_size}: "
        f"{effect}. "
        f"The matching rate is {batch_size / num_train:.4g} "
        "(`dpfpl sample-rate --num-train N --batch-size B`); set it as node config "
        "sample-rate (at most the run's max-sample-rate)"
    )
