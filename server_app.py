"""dpfpl ServerApp: builds the DP-FPL strategy from the run config and runs it."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from dpfpl_app.config import RunConfig

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config; results go to output-dir."""
    # a bad key stops the run here, in a second: torch, transformers and opacus (the
    # run's imports) take several seconds more
    RunConfig.from_flower(context.run_config)
    from dpfpl_app.federation.server_run import run_server
    from dpfpl_app.service.logs import route_app_logs

    route_app_logs()
    run_server(grid, context)
