"""What every route serves with: ``ServerState`` holds the model registry, the API keys and
their quotas, the metrics, the audit log, the limits, and the draining flag set on SIGTERM."""
from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from fastinfer.server.audit import AuditLog
from fastinfer.server.keys import KeyStore, QuotaTracker, hash_key
from fastinfer.server.metrics import ServerMetrics
from fastinfer.server.registry import ModelRegistry

DEFAULT_MAX_BODY_BYTES = 1 << 20


@dataclass
class ServerState:
    """Everything the app serves with. ``draining``: set on SIGTERM; new requests get 503."""

    registry: ModelRegistry
    keys: KeyStore = field(default_factory=KeyStore)
    quotas: QuotaTracker = field(default_factory=QuotaTracker)
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    audit: AuditLog = field(default_factory=lambda: AuditLog(None))
    admin_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_timeout: float = 30.0
    draining: bool = False

    def __post_init__(self) -> None:
        self._admin_hash = None if self.admin_key is None else hash_key(self.admin_key)
        self.admin_key = None  # kept only as a hash

    @property
    def admin_enabled(self) -> bool:
        """Whether the server was started with an admin key."""
        return self._admin_hash is not None

    def is_admin(self, presented: str | None) -> bool:
        """Whether ``presented`` is the admin key (compared in constant time)."""
        return (self._admin_hash is not None and presented is not None
                and hmac.compare_digest(hash_key(presented), self._admin_hash))
