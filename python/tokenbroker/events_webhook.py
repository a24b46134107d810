"""The webhook sink of events (`events_webhook_url`): each event POSTed as JSON
(`Event.as_dict`, `evidence` an object) to an operator's collector.

It has a bounded queue (`queue_max`) and a thread of its own, so a slow or dead collector
never holds up the events' delivery thread (the log, the audit file, the Redis stream)
and never grows memory: a full queue drops the new event, counted (`on_dropped`,
"webhook"). Each POST has a `timeout` (2 s); an answer of 5xx, 408 or 429 or a
connection failure is retried up to `retries` times, after 0.2 s, 0.4 s, 0.8 s ...
(`backoff` doubling); then the event is dropped and counted. Another answer outside 2xx
(a 4xx, a redirect: never followed, the event would go where the operator did not say)
drops it at once: trying again would get the same answer.

The URL may hold credentials (`https://user:pass@host/...`, sent as HTTP Basic) and its
path or query often is one (a Slack-style hook): logs and errors name its origin only
(`origin_of`). The thread starts with the first event and ends after `IDLE_SECONDS`
with nothing to do; `close()` gives what is queued `close_seconds` to go out."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

import structlog

if TYPE_CHECKING:
    from tokenbroker.events import Event

log = structlog.get_logger("tokenbroker.events")

IDLE_SECONDS = 5.0
FAILURE_LOG_SECONDS = 60.0
MAX_ANSWER_BYTES = 64 * 1024
RETRY_STATUSES = frozenset((408, 429))


def check_webhook_url(url: str) -> str:
    """`url` when it is an absolute http(s) URL with a host; else `ValueError` (whose
    message never repeats the URL: it may hold a secret)."""
    if url != url.strip() or any(c.isspace() for c in url):
        raise ValueError("must be an http(s) URL without spaces")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL with a host, e.g. https://alerts.example/hook")
    if parts.fragment or "#" in url:
        raise ValueError("must have no #fragment (it is never sent)")
    try:
        _ = parts.port  # a port that is not a number raises here
    except ValueError:
        raise ValueError("has a port that is not a number") from None
    return url


def origin_of(url: str) -> str:
    """What may be logged of `url`: scheme, host and port; never credentials, path or query."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are answers, not directions: the event goes nowhere the operator did not name."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _target(url: str) -> tuple[str, dict[str, str]]:
    """The URL to POST to (without credentials) and the headers, Basic auth from them."""
    parts = urlsplit(url)
    headers = {"Content-Type": "application/json", "User-Agent": "tokenbroker-events"}
    if parts.username is not None or parts.password is not None:
        pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        netloc = parts.netloc.rpartition("@")[2]
        url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    return url, headers


class WebhookSink:
    """POSTs each event to `url` (module doc). Thread-safe."""

    name = "webhook"

    def __init__(
        self,
        url: str,
        *,
        retries: int = 3,
        timeout: float = 2.0,
        backoff: float = 0.2,
        queue_max: int = 1_000,
        close_seconds: float = 2.0,
        on_dropped: Callable[[str], None] | None = None,
    ) -> None:
        check_webhook_url(url)
        if retries < 0 or queue_max < 1 or timeout <= 0 or backoff < 0:
            raise ValueError("retries and backoff must be >= 0, queue_max >= 1, timeout > 0")
        self._url, self._headers = _target(url)
        self.origin = origin_of(url)
        self._retries = retries
        self._timeout = timeout
        self._backoff = backoff
        self._queue: deque[bytes] = deque()
        self._queue_max = queue_max
        self._close_seconds = close_seconds
        self._on_dropped = on_dropped
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = threading.Event()
        self._deadline: float | None = None  # when closing: the last moment to send
        self._worker: threading.Thread | None = None
        self._closed = False
        self._last_failure_log: float | None = None
        self._opener = urllib.request.build_opener(_NoRedirect())

    def deliver(self, event: Event) -> None:
        """Queues `event` for the webhook thread; never blocks (a full queue drops it)."""
        body = json.dumps(event.as_dict(), separators=(",", ":"), default=str).encode("utf-8")
        with self._lock:
            if self._closed or len(self._queue) >= self._queue_max:
                queued = False
            else:
                self._queue.append(body)
                self._wake.notify()
                queued = True
                if self._worker is None:
                    self._worker = threading.Thread(target=self._run, name="tb-events-webhook", daemon=True)
                    self._worker.start()
        if not queued:
            self._dropped("queue full" if not self._closed else "closed")

    def close(self) -> None:
        """Gives the queued events `close_seconds` to go out, then drops (and counts) the rest."""
        with self._lock:
            self._closed = True
            self._deadline = time.monotonic() + self._close_seconds
            self._closing.set()
            self._wake.notify_all()
            worker = self._worker
        if worker is not None:
            worker.join(self._close_seconds + self._timeout + 1)
        with self._lock:
            left = len(self._queue)
            self._queue.clear()
        for _ in range(left):
            self._dropped("closed")

    # -- the webhook thread ---------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._queue and not self._closed:
                    self._wake.wait(IDLE_SECONDS)
                if not self._queue or self._past_deadline():
                    self._worker = None
                    return
                body = self._queue.popleft()
            self._send(body)

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _send(self, body: bytes) -> None:
        """POSTs `body`, retrying as the module doc says; counts and logs a drop."""
        why = ""
        for attempt in range(self._retries + 1):
            if attempt and not self._pause(self._backoff * 2 ** (attempt - 1)):
                why = f"{why}; closing before the next retry"
                break
            retry, why = self._post(body)
            if not why:
                return
            if not retry:
                break
        self._dropped(why)

    def _pause(self, seconds: float) -> bool:
        """Waits `seconds` before a retry, never past the close deadline; False when
        that deadline has come."""
        end = time.monotonic() + seconds
        if not self._closing.wait(seconds):
            return True
        deadline = self._deadline if self._deadline is not None else end
        time.sleep(max(0.0, min(end, deadline) - time.monotonic()))
        return not self._past_deadline()

    def _post(self, body: bytes) -> tuple[bool, str]:
        """One POST: (whether to retry, why it failed), `""` when it was delivered."""
        # The URL's scheme is http(s): check_webhook_url refused any other.
        request = urllib.request.Request(self._url, data=body, headers=self._headers, method="POST")  # noqa: S310
        try:
            with self._opener.open(request, timeout=self._timeout) as answer:
                answer.read(MAX_ANSWER_BYTES)
                status = int(answer.status)
        except urllib.error.HTTPError as exc:
            status = int(exc.code)
            exc.close()
        except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError and timeouts are OSErrors
            return True, type(exc).__name__
        if 200 <= status < 300:
            return False, ""
        return status >= 500 or status in RETRY_STATUSES, f"HTTP {status}"

    def _dropped(self, why: str) -> None:
        if self._on_dropped is not None:
            with contextlib.suppress(Exception):  # a counter must not stop the webhook thread
                self._on_dropped(self.name)
        now = time.monotonic()
        if self._last_failure_log is None or now - self._last_failure_log >= FAILURE_LOG_SECONDS:
            self._last_failure_log = now
            log.warning(
                "an event was not delivered to the webhook (logged once a minute; "
                'tokenbroker_events_dropped_total{sink="webhook"} counts them)',
                webhook=self.origin,
                why=why,
                retries=self._retries,
            )


__all__ = ["WebhookSink", "check_webhook_url", "origin_of"]
