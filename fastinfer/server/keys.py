"""API keys and their quotas for the OpenAI-compatible server.

A keys file holds one policy per key, the key itself only as its SHA-256 digest::

    {"keys": [{"id": "team-a", "key_sha256": "<64 hex>", "requests_per_minute": 60,
               "tokens_per_minute": 20000, "max_concurrent": 4, "models": ["chat"]}]}

Every limit is optional (absent or null: unlimited); ``models`` absent: every model.
``KeyStore`` checks a presented key against the stored digests; ``QuotaTracker`` counts each
key's requests and tokens over a sliding 60-second window. Nothing here needs FastAPI: the
app turns ``QuotaExceeded`` into a 429 and an unknown key into a 401.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fastinfer.errors import ConfigError
from fastinfer.validation import short_repr

WINDOW_S = 60.0  # the quota window: requests and tokens "per minute"
CONCURRENCY_RETRY_S = 1.0  # how long a client refused for max_concurrent is told to wait
LIMITS = ("requests_per_minute", "tokens_per_minute", "max_concurrent")
FIELDS = ("id", "key_sha256", *LIMITS, "models")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


# ----------------------------------------------------------------------------- policies
@dataclass(frozen=True)
class KeyPolicy:
    """One API key: its id (what logs and metrics show), its digest and its limits (None:
    unlimited). ``models`` None allows every model; the digest stays out of ``repr``."""

    id: str
    key_sha256: str = field(repr=False)
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    models: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id.strip():
            raise ConfigError(f"id must be a non-empty string, got {short_repr(self.id)}", "id")
        if not isinstance(self.key_sha256, str) or not _HEX_DIGEST.fullmatch(self.key_sha256):
            raise ConfigError("key_sha256 must be 64 lowercase hex characters (a SHA-256 digest), got "
                              f"{short_repr(self.key_sha256)}", "key_sha256")
        for name in LIMITS:
            _check_limit(name, getattr(self, name))
        if self.models is not None:
            object.__setattr__(self, "models", _check_models(self.models))

    def allows(self, model_name: str) -> bool:
        """Whether this key may use ``model_name`` (``"chat"``, or a version ``"chat@v2"``,
        which a policy listing ``"chat"`` allows)."""
        if self.models is None:
            return True
        return model_name in self.models or model_name.partition("@")[0] in self.models

    def to_entry(self) -> dict[str, Any]:
        """The keys-file entry of this policy (unset limits left out)."""
        entry: dict[str, Any] = {"id": self.id, "key_sha256": self.key_sha256}
        entry.update({name: getattr(self, name) for name in LIMITS if getattr(self, name) is not None})
        if self.models is not None:
            entry["models"] = list(self.models)
        return entry


def scope_of(policy: KeyPolicy | None) -> Callable[[str], bool] | None:
    """The models a caller may see and use, as a predicate over names (None: every model, for a
    server without keys)."""
    return None if policy is None else policy.allows


def _check_limit(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be a positive int or null (unlimited), got {short_repr(value)}", name)


def _check_models(models: Any) -> tuple[str, ...]:
    if isinstance(models, str) or not isinstance(models, (list, tuple)) or not models:
        raise ConfigError("models must be a non-empty list of model names (leave it out to allow every "
                          f"model), got {short_repr(models)}", "models")
    for name in models:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"models must hold non-empty strings, got {short_repr(name)}", "models")
    return tuple(models)


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of ``key``'s UTF-8 bytes: what a keys file stores."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- keys file
def load_keys_file(path: str | os.PathLike) -> list[KeyPolicy]:
    """The policies of a keys file; a missing, unreadable or malformed file raises
    ``ConfigError`` naming the file, the entry and the field."""
    return _policies(_read_document(path), os.fspath(path))


def _read_document(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"keys file {os.fspath(path)!r} does not exist", "keys_file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read keys file {os.fspath(path)!r}: {exc.strerror}", "keys_file") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"keys file {os.fspath(path)!r} is not valid JSON: {exc}", "keys_file") from exc
    if not isinstance(doc, dict) or set(doc) != {"keys"} or not isinstance(doc["keys"], list):
        raise ConfigError(f"keys file {os.fspath(path)!r} must be an object with exactly one field, "
                          f'"keys": a list of key entries; got {short_repr(doc)}', "keys")
    return doc


def _policies(doc: dict, path: str) -> list[KeyPolicy]:
    policies: list[KeyPolicy] = []
    for i, entry in enumerate(doc["keys"]):
        policies.append(_policy_from_entry(entry, f"{path}: keys[{i}]", f"keys[{i}]"))
    try:
        _check_unique(policies)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}", exc.argument) from None
    return policies


def _policy_from_entry(entry: Any, where: str, argument: str) -> KeyPolicy:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be an object, got {short_repr(entry)}", argument)
    unknown = [name for name in entry if name not in FIELDS]
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; expected only {', '.join(FIELDS)}",
                          f"{argument}.{unknown[0]}")
    for name in ("id", "key_sha256"):
        if name not in entry:
            raise ConfigError(f"{where}: missing required field {name!r}", f"{argument}.{name}")
    try:
        return KeyPolicy(**entry)
    except ConfigError as exc:
        raise ConfigError(f"{where}.{exc.argument}: {exc}", f"{argument}.{exc.argument}") from None


def _check_unique(policies: Iterable[KeyPolicy]) -> None:
    """Refuses two policies with one id (logs could not tell them apart) or one key (which
    policy would apply?)."""
    ids: dict[str, int] = {}
    digests: dict[str, int] = {}
    for i, p in enumerate(policies):
        if p.id in ids:
            raise ConfigError(f"keys[{i}].id: duplicate key id {p.id!r} (also keys[{ids[p.id]}])",
                              f"keys[{i}].id")
        if p.key_sha256 in digests:
            raise ConfigError(f"keys[{i}].key_sha256: the same key as keys[{digests[p.key_sha256]}]",
                              f"keys[{i}].key_sha256")
        ids[p.id], digests[p.key_sha256] = i, i


def add_key(path: str | os.PathLike, key_id: str, *, requests_per_minute: int | None = None,
            tokens_per_minute: int | None = None, max_concurrent: int | None = None,
            models: list[str] | None = None) -> str:
    """Makes a new key, appends its policy (the digest only) to the keys file at ``path``
    (created when missing) and returns the key: the only time it exists in plain text.

    The file is rewritten atomically with mode 0600. Two ``add_key`` calls on one file at the
    same moment may lose one of the two entries: run them one after the other."""
    path = os.fspath(path)
    doc = _read_document(path) if os.path.exists(path) else {"keys": []}
    existing = _policies(doc, path)
    if any(p.id == key_id for p in existing):
        raise ConfigError(f"{path}: key id {key_id!r} already exists; choose another id", "id")
    key = "fi-" + secrets.token_urlsafe(32)
    policy = KeyPolicy(key_id, hash_key(key), requests_per_minute, tokens_per_minute, max_concurrent, models)
    doc["keys"].append(policy.to_entry())
    _write_atomically(path, json.dumps(doc, indent=2) + "\n")
    return key


def _write_atomically(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".keys-", suffix=".tmp")
    except OSError as exc:
        raise ConfigError(f"cannot write keys file {path!r}: {exc.strerror}", "keys_file") from exc
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- authentication
class KeyStore:
    """The server's keys: policies from a keys file plus plain ``--api-key`` keys (ids
    ``key-1``, ``key-2``, ...; no limits). Only digests are kept."""

    def __init__(self, policies: Iterable[KeyPolicy] = (), plain_keys: Iterable[str] = ()) -> None:
        self._policies = list(policies)
        for n, key in enumerate(plain_keys, start=1):
            if not isinstance(key, str) or not key:
                raise ConfigError(f"--api-key must be a non-empty string, got {type(key).__name__}", "api_key")
            self._policies.append(KeyPolicy(f"key-{n}", hash_key(key)))
        _check_unique(self._policies)
        self._digests = [p.key_sha256.encode("ascii") for p in self._policies]

    @classmethod
    def from_sources(cls, keys_file: str | os.PathLike | None = None, plain_keys: Iterable[str] | None = None) -> KeyStore:
        """The keys of a keys file (``fastinfer keys``; None: none) and plain keys without limits."""
        return cls(load_keys_file(keys_file) if keys_file else [], plain_keys=plain_keys or ())

    @property
    def enabled(self) -> bool:
        """False when there are no keys: the server is open to anyone."""
        return bool(self._policies)

    @property
    def policies(self) -> list[KeyPolicy]:
        """Every policy, file keys first, then the plain keys."""
        return list(self._policies)

    def authenticate(self, presented: str | None) -> KeyPolicy | None:
        """The policy of ``presented`` (the bearer token), or None when it matches no key.

        Compares against every digest in constant time, with no early exit, so the time
        taken reveals neither which key matched nor a shared prefix."""
        if not isinstance(presented, str):
            return None
        digest = hash_key(presented).encode("ascii")
        match = None
        for policy, stored in zip(self._policies, self._digests):
            if hmac.compare_digest(digest, stored):
                match = policy
        return match


# ----------------------------------------------------------------------------- quotas
class QuotaExceeded(Exception):
    """A request refused by a key's quota. ``retry_after``: seconds until it would fit;
    ``never_fits``: the request alone exceeds ``tokens_per_minute`` (retrying cannot help);
    ``limit``: the name of the limit that refused it."""

    def __init__(self, reason: str, retry_after: float, *, limit: str, never_fits: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.retry_after, self.limit, self.never_fits = reason, retry_after, limit, never_fits


@dataclass(frozen=True)
class QuotaUsage:
    """A key's accounting now: requests open, and requests and tokens in the last 60 s."""

    open_requests: int
    requests_in_window: int
    tokens_in_window: int


class _Entry:
    """One request in a key's window; ``live`` turns False when it leaves the window."""

    __slots__ = ("time", "tokens", "live")

    def __init__(self, t: float, tokens: int) -> None:
        self.time, self.tokens, self.live = t, tokens, True


class _KeyState:
    __slots__ = ("open", "entries", "tokens")

    def __init__(self) -> None:
        self.open = 0
        self.entries: deque[_Entry] = deque()
        self.tokens = 0


class Lease:
    """A request admitted by ``QuotaTracker.acquire``; ``release`` it when the request ends
    (or use it as a context manager)."""

    def __init__(self, tracker: QuotaTracker, key_id: str, entry: _Entry | None) -> None:
        self._tracker, self.key_id, self._entry = tracker, key_id, entry
        self.released = False

    def release(self, actual_tokens: int | None = None) -> None:
        """Frees the concurrency slot (only the first call counts) and, with ``actual_tokens``,
        replaces the token estimate with the real usage while the request is still in the window."""
        if actual_tokens is not None and (isinstance(actual_tokens, bool) or not isinstance(actual_tokens, int)
                                          or actual_tokens < 0):
            raise ValueError(f"actual_tokens must be an int >= 0, got {short_repr(actual_tokens)}")
        self._tracker._release(self, actual_tokens)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class QuotaTracker:
    """Per-key quota accounting over a sliding 60-second window; thread-safe. Keys without
    per-minute limits keep no window, and entries are dropped as they leave it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, _KeyState] = {}

    def acquire(self, policy: KeyPolicy, tokens: int) -> Lease:
        """Admits one request of about ``tokens`` tokens (prompt + max_tokens) for ``policy``,
        or raises ``QuotaExceeded``."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens must be an int >= 0, got {short_repr(tokens)}")
        with self._lock:
            now = self._clock()
            state = self._states.setdefault(policy.id, _KeyState())
            self._evict(state, now)
            refusal = _refusal(policy, state, tokens, now)
            if refusal is not None:
                self._forget_if_idle(policy.id, state)
                raise refusal
            state.open += 1
            entry = None
            if policy.requests_per_minute is not None or policy.tokens_per_minute is not None:
                entry = _Entry(now, tokens)
                state.entries.append(entry)
                state.tokens += tokens
            return Lease(self, policy.id, entry)

    def usage(self, key_id: str) -> QuotaUsage:
        """What ``key_id`` holds now (all zero for a key never seen)."""
        with self._lock:
            state = self._states.get(key_id)
            if state is None:
                return QuotaUsage(0, 0, 0)
            self._evict(state, self._clock())
            usage = QuotaUsage(state.open, len(state.entries), state.tokens)
            self._forget_if_idle(key_id, state)
            return usage

    def _release(self, lease: Lease, actual_tokens: int | None) -> None:
        with self._lock:
            if lease.released:
                return
            lease.released = True
            state = self._states[lease.key_id]
            state.open -= 1
            entry = lease._entry
            if actual_tokens is not None and entry is not None and entry.live:
                state.tokens += actual_tokens - entry.tokens
                entry.tokens = actual_tokens
            self._evict(state, self._clock())
            self._forget_if_idle(lease.key_id, state)

    @staticmethod
    def _evict(state: _KeyState, now: float) -> None:
        while state.entries and state.entries[0].time <= now - WINDOW_S:
            entry = state.entries.popleft()
            entry.live = False
            state.tokens -= entry.tokens

    def _forget_if_idle(self, key_id: str, state: _KeyState) -> None:
        if state.open == 0 and not state.entries:
            del self._states[key_id]


def _refusal(policy: KeyPolicy, state: _KeyState, tokens: int, now: float) -> QuotaExceeded | None:
    """Why ``policy`` cannot take a request of ``tokens`` now (None: it can)."""
    who = f"for key {policy.id!r}"
    tpm = policy.tokens_per_minute
    if tpm is not None and tokens > tpm:
        return QuotaExceeded(f"request needs {tokens} tokens, more than the tokens_per_minute limit of {tpm} "
                             f"{who}: it can never fit", WINDOW_S, limit="tokens_per_minute", never_fits=True)
    if policy.max_concurrent is not None and state.open >= policy.max_concurrent:
        return QuotaExceeded(f"max_concurrent limit of {policy.max_concurrent} reached {who}",
                             CONCURRENCY_RETRY_S, limit="max_concurrent")
    rpm = policy.requests_per_minute
    if rpm is not None and len(state.entries) >= rpm:
        wait = state.entries[len(state.entries) - rpm].time + WINDOW_S - now
        return QuotaExceeded(f"requests_per_minute limit of {rpm} reached {who}", wait,
                             limit="requests_per_minute")
    if tpm is not None and state.tokens + tokens > tpm:
        wait = _tokens_wait(state, state.tokens + tokens - tpm, now)
        return QuotaExceeded(f"tokens_per_minute limit of {tpm} reached {who} ({state.tokens} used in the "
                             f"last 60 s, this request needs {tokens})", wait, limit="tokens_per_minute")
    return None


def _tokens_wait(state: _KeyState, excess: int, now: float) -> float:
    """Seconds until at least ``excess`` tokens have left the window."""
    freed = 0
    for entry in state.entries:
        freed += entry.tokens
        if freed >= excess:
            return entry.time + WINDOW_S - now
    return WINDOW_S  # unreachable while a request alone fits the limit
