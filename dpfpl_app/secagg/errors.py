"""The two ways a secure-aggregation round can refuse to go on.

``SecAggAbort`` ends the whole round: nothing is released and, since nothing is
released, no privacy budget is spent. ``InputOutOfBound`` is a client refusing its own
input, raised before anything derived from that input leaves the node.
"""

from __future__ import annotations


class SecAggAbort(RuntimeError):
    """The round is discarded at ``stage``; ``reason`` says why, with node ids and counts.

    Raised by the server (and by a client that sees the server break a rule) whenever
    continuing could release something the accounting does not cover: fewer survivors
    than the threshold, a secret that cannot be reconstructed consistently, or an
    unmasked sum outside its proven bound.
    """

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"secure aggregation aborted at stage {stage!r}: {reason}")
        self.stage = stage
        self.reason = reason


class InputOutOfBound(ValueError):
    """A client input that would break the ring's no-wrap guarantee or the sensitivity.

    The ring width is chosen for inputs of L2 norm at most ``clip``; a larger input
    could wrap around modulo 2^bits and silently corrupt the sum, and would exceed
    the sensitivity the accounting assumes. Clip before calling, never after.
    """
