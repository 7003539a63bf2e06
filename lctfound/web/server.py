"""Start the LCTfound web server: the app, the access gate, the URL line, then serve until stopped."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional

from ..errors import LCTfoundError
from .config import WebConfig
from .security import AccessGate, check_bind, is_loopback, page_url

#: Printed once the server listens (tests and scripts wait for it).
READY_PREFIX = "LCTfound web: open "


def require_web_stack() -> None:
    """A clear error when the optional web dependencies are missing."""
    try:
        import trame_slicer  # noqa: F401
    except ImportError as error:
        raise LCTfoundError(f"the web app needs trame-slicer ({error}); install it with: pip install 'lctfound[web]'") \
            from None


def prepare_environment() -> None:
    """Offscreen rendering without a display (OSMesa), unless the user chose otherwise."""
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkOSOpenGLRenderWindow")
    # wslink prints this when it starts; our own ready line replaces it.
    os.environ.setdefault("WSLINK_READY_MSG", "")


def build(config: WebConfig, server: Any = None):
    """The app and its gate on a trame server (not started)."""
    from trame.app import get_server

    from .app import LCTfoundWebApp

    check_bind(config.host, config.token)
    server = server or get_server("lctfound-web", client_type="vue3")
    app = LCTfoundWebApp(config, server)
    gate = AccessGate(config.token, loopback_only=is_loopback(config.host))

    def bind(wslink_server: Any) -> None:
        wslink_server.app.middlewares.append(gate.middleware())
        protocol = server.protocol
        # wslink calls these on its server protocol when they exist (instance attributes win).
        protocol.validateToken = gate.validate_ws_token
        original_connect = protocol.onConnect
        original_close = protocol.onClose

        def on_connect(request: Any, client_id: str) -> None:
            gate.note_ws_client(request, client_id)
            original_connect(request, client_id)

        def on_close(client_id: str) -> None:
            gate.forget_ws_client(client_id)
            original_close(client_id)

        protocol.onConnect = on_connect
        protocol.onClose = on_close

    server.controller.on_server_bind.add(bind)
    return app, gate


def serve(config: WebConfig, on_ready: Optional[Callable[[str], None]] = None) -> int:
    """Serve until interrupted. Prints ``LCTfound web: open URL`` when ready."""
    prepare_environment()
    require_web_stack()
    app, _ = build(config)
    server = app.server

    def ready(**_: Any) -> None:
        url = page_url(config.host, server.port, config.token)
        print(f"{READY_PREFIX}{url}", flush=True)
        if on_ready is not None:
            on_ready(url)

    server.controller.on_server_ready.add(ready)
    # trame parses sys.argv for its own options; give it only what this command decided.
    saved = sys.argv
    sys.argv = [saved[0], "--server", "--timeout", "0"] + (["--authKey", config.token] if config.token else [])
    try:
        server.start(host=config.host, port=config.port, open_browser=False, show_connection_info=False,
                     timeout=0, disable_logging=True)
    finally:
        sys.argv = saved
    return 0
