"""The method: the prompt learner (DP-FPL and its baselines as configurations), its text
encoder, per-sample gradients, a client's trainer and the exported prompt file.
"""
