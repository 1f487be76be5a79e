"""One copy of every log line, and the app's own progress visible inside ``flwr run``.

Two things go wrong without this. opacus calls ``logging.basicConfig`` when it is
imported, which gives the root logger a stderr handler: Flower's logger propagates to
the root, so every Flower line is printed twice (and both copies are streamed by
``flwr run``). And the app's loggers (``dpfpl_app.*``: backbone build, feature encoding,
model loading) have no handler of their own, so they fall through to the root at
WARNING and their INFO progress never shows.
"""

from __future__ import annotations

import logging

APP_LOGGER = "dpfpl_app"


def route_app_logs() -> None:
    """Send ``dpfpl_app`` logs through Flower's console handler; drop opacus's root handler.

    Idempotent: the entry points call it on every message. Call it after opacus is
    imported (it is imported here to make sure), or the handler would come back.
    """
    import opacus  # noqa: F401  - its import is what installs the root handler
    from flwr.common.logger import console_handler

    root = logging.getLogger()
    for handler in list(root.handlers):
        if _installed_by_opacus(handler):
            root.removeHandler(handler)
    app = logging.getLogger(APP_LOGGER)
    app.setLevel(logging.INFO)
    if console_handler not in app.handlers:
        app.addHandler(console_handler)


def _installed_by_opacus(handler: logging.Handler) -> bool:
    """The stderr handler of opacus's ``basicConfig`` (its format), not a user's own."""
    fmt = getattr(handler.formatter, "_fmt", None)
    return type(handler) is logging.StreamHandler and fmt == "%(asctime)s:%(levelname)s:%(message)s"
