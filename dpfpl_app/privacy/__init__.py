"""Privacy: clipping and factorisation mechanics, noise sources, the DP channel plan, the
accountants and the calibration that turns a target epsilon into noise multipliers.

Modules here that the secure-aggregation key-exchange stages import (``keystream``,
``calibration``, ``secure_channel``) stay free of torch.
"""
