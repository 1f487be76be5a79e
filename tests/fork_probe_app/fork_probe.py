"""A test-only Flower app: each node says which process answered and which code it ran.

``tests/test_fork_superexec.py`` submits it, inside a copy of the real app, to a SuperNode
served by ``dpfpl-superexec``: the ClientApp must be a child of the zygote, not of the
SuperExec, and must run the FAB's ``dpfpl_app``, not the copy installed beside the
command.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.query()
def answer(msg: Message, context: Context) -> Message:
    import dpfpl_app

    facts = ConfigRecord(
        {"pid": os.getpid(), "ppid": os.getppid(), "dpfpl-app": str(dpfpl_app.__file__)}
    )
    return Message(RecordDict({"facts": facts}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 120
    while not (nodes := list(grid.get_node_ids())) and time.monotonic() < deadline:
        time.sleep(1)
    answers = []
    for _ in range(int(context.run_config["num-server-rounds"])):  # one message per round
        asks = [Message(RecordDict(), dst_node_id=node, message_type="query") for node in nodes]
        for reply in grid.send_and_receive(asks, timeout=120):
            answers.append(dict(reply.content["facts"]) if reply.has_content() else {})
    out = Path(str(context.run_config["output-dir"])) / "fork-probe.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(answers))
