"""dpfpl ServerApp: builds the DP-FPL strategy from the run config and runs it."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from dpfpl_app.server_run import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config; results go to output-dir."""
    run_server(grid, context)
