"""Registry announcements over Redis pub/sub: a push or rollback wakes every serving process at once.

Announcements only shorten the wait: serving processes also read the registry's pointers
every `FEWSTEP_WATCH_INTERVAL_S` (service/versions.py), so a lost message (pub/sub delivers
at most once, and not to a process that was disconnected) costs one interval, never a version.
In embedded mode there is no channel and the pointer watch is all there is.
"""

from __future__ import annotations

import json
import logging
import threading

from fewstep.service.queue.keys import Keys
from fewstep.service.settings import Settings

log = logging.getLogger("fewstep.watch")


def announce(settings: Settings, model: str, version: str, event: str) -> int:
    """Tell subscribed gateways and workers that `model` now points at `version`; how many heard it.

    0 without Redis, or when Redis cannot be reached (the pointer watch still finds it).
    """
    if settings.redis_url is None:
        return 0
    import redis

    try:
        r = redis.Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=5, socket_connect_timeout=5)
        try:
            message = json.dumps({"model": model, "version": version, "event": event})
            return int(r.publish(Keys(settings.redis_prefix).registry_channel, message))
        finally:
            r.close()
    except redis.RedisError as e:
        log.warning(
            "could not announce %s:%s (%s); serving processes will see it within %.0f s",
            model,
            version,
            type(e).__name__,
            settings.watch_interval_s,
        )
        return 0


def subscribe(settings: Settings, nudges: list[threading.Event], stop: threading.Event) -> threading.Thread | None:
    """A daemon thread that sets every one of `nudges` on every announcement until `stop`; None without Redis."""
    if settings.redis_url is None:
        return None
    t = threading.Thread(target=_listen, args=(settings, nudges, stop), name="registry-watch", daemon=True)
    t.start()
    return t


def _listen(settings: Settings, nudges: list[threading.Event], stop: threading.Event) -> None:
    import redis

    assert settings.redis_url is not None
    channel = Keys(settings.redis_prefix).registry_channel
    backoff = 0.5
    while not stop.is_set():
        try:
            r = redis.Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=5, socket_connect_timeout=5)
            pubsub = r.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(channel)
                backoff = 0.5
                for nudge in nudges:  # announcements missed while disconnected: look now
                    nudge.set()
                while not stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        log.info("registry announcement: %s", message.get("data"))
                        for nudge in nudges:
                            nudge.set()
            finally:
                pubsub.close()
                r.close()
        except redis.RedisError as e:
            log.debug("registry channel unavailable (%s); retrying", e)
            stop.wait(backoff)
            backoff = min(backoff * 2, 10.0)
