"""Print a run-config TOML file as one ``flwr run --run-config`` argument of key=value pairs.

Flower takes either one TOML file or key=value pairs, never both; the quickstart passes
the main job's file this way so that a user's own ``--run-config "key=value"`` still works
beside it.
"""

import json
import sys

import tomllib

with open(sys.argv[1], "rb") as handle:
    table = tomllib.load(handle)
print(" ".join(f"{key}={json.dumps(value)}" for key, value in table.items()))
