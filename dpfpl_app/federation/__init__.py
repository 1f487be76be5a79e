"""Flower wiring: the strategy and its secure rounds, the ServerApp's run, the ClientApp's
node state and answers, the message protocol, checkpoints and results.

Importing this package imports nothing: the light ClientApp stages import only the
modules they need.
"""
