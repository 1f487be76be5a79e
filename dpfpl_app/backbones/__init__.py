"""Backbones: loading a frozen CLIP (hub id, local directory or project name) and building,
pretraining and saving the project's small offline CLIP and its tokenizer.
"""
