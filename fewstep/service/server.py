"""`fewstep serve`: the gateway under uvicorn, with a drain before it stops listening (service/drain.py)."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import uvicorn

from fewstep.service.app import create_app
from fewstep.service.drain import Drain
from fewstep.service.protocol import guarded_protocol, head_buffer
from fewstep.service.settings import Settings

log = logging.getLogger("fewstep.service")


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM / SIGINT drains (`Drain`) before it stops listening; a second
    SIGINT stops at once. Signals are not re-raised after shutdown, so a drained exit is exit code 0."""

    def __init__(self, config: uvicorn.Config, drain: Drain, drain_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_s = drain_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining.is_set():
            if sig == signal.SIGINT:
                self.force_exit = True
            return
        log.info("%s: draining %d in flight (up to %.0f s)", signal.Signals(sig).name, self.drain.active, self.drain_s)
        self.drain.start()
        threading.Thread(target=self._stop_when_idle, name="drain", daemon=True).start()

    def _stop_when_idle(self) -> None:
        if not self.drain.wait_idle(self.drain_s):
            log.warning("drain: %d still in flight after %.0f s (`drain_s`); stopping", self.drain.active, self.drain_s)
        self.should_exit = True  # uvicorn's main loop checks this every tick


def serve(settings: Settings) -> int:
    """Run the gateway until a signal has drained it; the exit status."""
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws="websockets-sansio",
        ws_max_size=max(settings.ws_max_bytes, settings.realtime_max_frame_bytes),  # text: checked in the app
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=5,  # after the drain: only idle keep-alive connections are left
        http=guarded_protocol(settings.head_timeout_s, settings.max_connections, settings.max_header_bytes),
        timeout_keep_alive=settings.keep_alive_s,
        h11_max_incomplete_event_size=head_buffer(settings.max_header_bytes),  # a header block still arriving
        # Forwarded addresses only from the proxies named (uvicorn's own default trusts any loopback peer).
        proxy_headers=bool(settings.forwarded_allow_ips.strip()),
        forwarded_allow_ips=settings.forwarded_allow_ips.strip() or "",
    )
    server = DrainingServer(config, app.state.gateway.drain, settings.drain_s)
    server.run()
    return 0
