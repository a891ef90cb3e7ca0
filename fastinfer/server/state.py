"""What every route serves with: ``ServerState`` holds the model registry, the API keys and
their quotas, the metrics, the audit log, the limits, and the draining flag set on SIGTERM."""
from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass, field

from fastinfer.server.audit import AuditLog
from fastinfer.server.keys import KeyStore, QuotaTracker, hash_key
from fastinfer.server.metrics import ServerMetrics
from fastinfer.server.registry import ModelRegistry

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 30.0


@dataclass
class ServerState:
    """Everything the app serves with. ``draining``: set by ``drain`` (on SIGTERM); new requests
    get 503. ``header_timeout`` / ``body_timeout``: seconds a client has to send a request's
    head (else the connection is closed) and its body (else 408). ``metrics_key``: when set,
    ``/metrics`` needs it (or the admin key). ``enable_docs``: serve ``/docs``. ``tool_call_parser``: how
    chat replies are read for tool calls (``fastinfer.server.tools.PARSERS``; None: from the
    model's chat template)."""

    registry: ModelRegistry
    keys: KeyStore = field(default_factory=KeyStore)
    quotas: QuotaTracker = field(default_factory=QuotaTracker)
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    audit: AuditLog = field(default_factory=lambda: AuditLog(None))
    admin_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_timeout: float = 30.0
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S
    metrics_key: str | None = None
    enable_docs: bool = False
    tool_call_parser: str | None = None  # None: chosen from each model's chat template
    draining: bool = False

    def __post_init__(self) -> None:
        self._admin_hash = None if self.admin_key is None else hash_key(self.admin_key)
        self._metrics_hash = None if self.metrics_key is None else hash_key(self.metrics_key)
        self.admin_key = self.metrics_key = None  # kept only as hashes

    @property
    def admin_enabled(self) -> bool:
        """Whether the server was started with an admin key."""
        return self._admin_hash is not None

    @property
    def metrics_protected(self) -> bool:
        """Whether ``/metrics`` needs a key (the server was started with a metrics key)."""
        return self._metrics_hash is not None

    def is_admin(self, presented: str | None) -> bool:
        """Whether ``presented`` is the admin key (compared in constant time)."""
        return _matches(presented, self._admin_hash)

    def may_read_metrics(self, presented: str | None) -> bool:
        """Whether ``presented`` opens ``/metrics``: the metrics key or the admin key."""
        return _matches(presented, self._metrics_hash) | _matches(presented, self._admin_hash)

    async def drain(self) -> bool:
        """Stops taking requests (new ones get 503 while the server still accepts connections),
        lets the ones in flight finish for up to ``shutdown_timeout`` seconds, then shuts the
        engines down, aborting what is left (those clients get a 503 or an error event).
        Returns whether every request finished in time; calling it again does nothing more."""
        self.draining = True
        versions = self.registry.versions()
        idle = await asyncio.gather(*(mv.wait_idle(self.shutdown_timeout) for mv in versions))
        await self.registry.shutdown(0)
        return all(idle)


def _matches(presented: str | None, digest: str | None) -> bool:
    """Whether ``presented`` hashes to ``digest`` (compared in constant time)."""
    return digest is not None and presented is not None and hmac.compare_digest(hash_key(presented), digest)
