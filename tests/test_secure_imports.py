"""The key-exchange stages of a secure round must not pay for torch or CLIP.

In deployment each message starts a fresh ClientApp process: this runs the real
handlers of ``client_app`` for the setup and share-keys stages in a fresh interpreter
and checks that torch (and the other heavy imports) never got loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
sys.path.insert(0, "tests")
from flower_harness import make_instruction
from flwr.app import Context, RecordDict
import client_app
from dpfpl_app.config import RunConfig
from dpfpl_app.secagg import ServerRound, Stage
from dpfpl_app.secagg.records import add_payload, message_type, read_payload
from dpfpl_app.privacy.secure_channel import config_for

run_config = RunConfig(aggregation="secure", min_nodes=3, num_server_rounds=2).to_flower()
nodes = [11, 22, 33]
server = ServerRound(config_for(RunConfig.from_flower(run_config), 64), nodes)
contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(),
                       run_config=run_config) for n in nodes}

def stage(name, payloads):
    replies = {}
    for node, payload in payloads.items():
        msg = make_instruction(add_payload(RecordDict(), payload), dst_node_id=node,
                               message_type=message_type(name))
        replies[node] = read_payload(client_app.app(msg, contexts[node]).content)
    return replies

stage(Stage.SHARE_KEYS, server.share_keys(stage(Stage.SETUP, server.setup())))
heavy = [m for m in ("torch", "opacus", "transformers", "scipy") if m in sys.modules]
print(heavy)
sys.exit(1 if heavy else 0)
"""


def test_key_exchange_handlers_do_not_import_torch() -> None:
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]


def test_the_per_message_process_imports_only_flower_the_worker_link_and_stage_names() -> None:
    # With node-worker=true the process Flower starts for each message only hands the
    # message over: whatever client_app imports at module level, every message pays for
    code = (
        "import sys, json; import flwr.app, flwr.clientapp; before = set(sys.modules);"
        "import client_app; print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ours = {m for m in json.loads(run.stdout) if m.split(".")[0] in ("dpfpl_app", "client_app")}
    assert ours == {
        "client_app", "dpfpl_app", "dpfpl_app.federation", "dpfpl_app.secagg",
        "dpfpl_app.secagg.wire", "dpfpl_app.federation.message_timing",
        "dpfpl_app.federation.node_worker_link", "dpfpl_app.federation.worker_protocol",
    }, sorted(ours)
    heavy = {"torch", "pydantic", "cryptography", "scipy", "transformers"}
    assert not heavy & {m.split(".")[0] for m in json.loads(run.stdout)}
