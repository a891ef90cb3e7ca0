"""API keys: the keys file, authentication, model filters, quotas over a fake clock, and
``fastinfer keys add``."""
from __future__ import annotations

import json
import os
import stat
import sys
import threading

import pytest

from fastinfer.cli.main import main
from fastinfer.errors import ConfigError
from fastinfer.server.keys import (KeyPolicy, KeyStore, QuotaExceeded, QuotaTracker, QuotaUsage, add_key,
                                   hash_key, load_keys_file)

DIGEST = hash_key("secret")


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def write_keys(path, entries) -> str:
    path.write_text(json.dumps({"keys": entries}))
    return str(path)


# ----------------------------------------------------------------------------- keys file
def test_add_key_round_trip_stores_only_the_hash_with_mode_0600(tmp_path):
    path = tmp_path / "keys.json"
    key = add_key(path, "team-a", requests_per_minute=60, tokens_per_minute=20000, max_concurrent=4,
                  models=["chat"])
    assert key.startswith("fi-") and len(key) > 40
    text = path.read_text()
    assert key not in text and key[3:] not in text
    assert hash_key(key) in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    [policy] = load_keys_file(path)
    assert policy == KeyPolicy("team-a", hash_key(key), 60, 20000, 4, ("chat",))
    assert KeyStore(load_keys_file(path)).authenticate(key) == policy


def test_add_key_appends_leaves_no_temp_file_and_omits_unset_limits(tmp_path):
    path = tmp_path / "keys.json"
    k1 = add_key(path, "a")
    k2 = add_key(path, "b", max_concurrent=2)
    assert k1 != k2
    assert [p.id for p in load_keys_file(path)] == ["a", "b"]
    assert json.loads(path.read_text())["keys"][0] == {"id": "a", "key_sha256": hash_key(k1)}
    assert sorted(os.listdir(tmp_path)) == ["keys.json"]


def test_add_key_refuses_a_duplicate_id_and_leaves_the_file_unchanged(tmp_path):
    path = tmp_path / "keys.json"
    add_key(path, "team-a")
    before = path.read_text()
    with pytest.raises(ConfigError, match="'team-a' already exists"):
        add_key(path, "team-a")
    assert path.read_text() == before


@pytest.mark.parametrize("kwargs, field", [(dict(requests_per_minute=0), "requests_per_minute"),
                                           (dict(tokens_per_minute=-5), "tokens_per_minute"),
                                           (dict(max_concurrent=1.5), "max_concurrent"),
                                           (dict(models=[]), "models"), (dict(models="chat"), "models")])
def test_add_key_refuses_bad_limits_without_writing(tmp_path, kwargs, field):
    path = tmp_path / "keys.json"
    with pytest.raises(ConfigError, match=field) as info:
        add_key(path, "a", **kwargs)
    assert info.value.argument == field
    assert not path.exists()


@pytest.mark.parametrize("entry, field, words", [
    ({"key_sha256": DIGEST}, "id", "missing required field 'id'"),
    ({"id": "", "key_sha256": DIGEST}, "id", "non-empty string"),
    ({"id": 7, "key_sha256": DIGEST}, "id", "non-empty string"),
    ({"id": "a"}, "key_sha256", "missing required field 'key_sha256'"),
    ({"id": "a", "key_sha256": DIGEST.upper()}, "key_sha256", "64 lowercase hex"),
    ({"id": "a", "key_sha256": DIGEST[:-1]}, "key_sha256", "64 lowercase hex"),
    ({"id": "a", "key_sha256": DIGEST, "requests_per_minute": 0}, "requests_per_minute", "positive int"),
    ({"id": "a", "key_sha256": DIGEST, "tokens_per_minute": "100"}, "tokens_per_minute", "positive int"),
    ({"id": "a", "key_sha256": DIGEST, "max_concurrent": True}, "max_concurrent", "positive int"),
    ({"id": "a", "key_sha256": DIGEST, "models": ["chat", ""]}, "models", "non-empty strings"),
    ({"id": "a", "key_sha256": DIGEST, "models": "chat"}, "models", "list of model names"),
    ({"id": "a", "key_sha256": DIGEST, "key": "plain"}, "key", "unknown field 'key'"),
])
def test_malformed_entry_is_refused_naming_file_index_and_field(tmp_path, entry, field, words):
    good = {"id": "ok", "key_sha256": hash_key("other")}
    path = write_keys(tmp_path / "keys.json", [good, entry])
    with pytest.raises(ConfigError) as info:
        load_keys_file(path)
    message = str(info.value)
    assert path in message and "keys[1]" in message and field in message and words in message
    assert info.value.argument == f"keys[1].{field}"


def test_duplicate_ids_and_duplicate_keys_in_a_file_are_refused(tmp_path):
    path = write_keys(tmp_path / "k.json", [{"id": "a", "key_sha256": DIGEST},
                                             {"id": "a", "key_sha256": hash_key("x")}])
    with pytest.raises(ConfigError, match=r"keys\[1\]\.id: duplicate key id 'a'"):
        load_keys_file(path)
    path = write_keys(tmp_path / "k.json", [{"id": "a", "key_sha256": DIGEST}, {"id": "b", "key_sha256": DIGEST}])
    with pytest.raises(ConfigError, match=r"keys\[1\]\.key_sha256: the same key as keys\[0\]"):
        load_keys_file(path)


@pytest.mark.parametrize("text, words", [("{not json", "not valid JSON"), ('{"keys": {}}', "list of key entries"),
                                         ('{"keys": [], "extra": 1}', "exactly one field"),
                                         ('{"keys": ["a"]}', r"keys\[0\] must be an object")])
def test_malformed_document_is_refused(tmp_path, text, words):
    path = tmp_path / "keys.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_keys_file(path)


def test_missing_keys_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_keys_file(tmp_path / "nope.json")


def test_null_limits_mean_unlimited(tmp_path):
    path = write_keys(tmp_path / "k.json", [{"id": "a", "key_sha256": DIGEST, "requests_per_minute": None,
                                              "models": None}])
    assert load_keys_file(path) == [KeyPolicy("a", DIGEST)]


def test_repr_leaves_out_the_digest():
    assert DIGEST not in repr(KeyPolicy("a", DIGEST))


# ----------------------------------------------------------------------------- authentication
def test_authenticate_right_wrong_and_missing_key():
    a, b = KeyPolicy("a", hash_key("key-a")), KeyPolicy("b", hash_key("key-b"))
    store = KeyStore([a, b])
    assert store.enabled
    assert store.authenticate("key-a") is a
    assert store.authenticate("key-b") is b
    assert store.authenticate("key-c") is None
    assert store.authenticate("") is None
    assert store.authenticate(None) is None
    assert store.authenticate(hash_key("key-a")) is None  # the digest itself is not a key


def test_authenticate_compares_with_every_key_even_after_a_match(monkeypatch):
    import fastinfer.server.keys as keys

    calls = []
    real = keys.hmac.compare_digest
    monkeypatch.setattr(keys.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    store = KeyStore([KeyPolicy(f"k{i}", hash_key(f"key{i}")) for i in range(5)])
    assert store.authenticate("key0").id == "k0"
    assert len(calls) == 5


def test_plain_keys_get_numbered_ids_no_limits_and_are_held_as_hashes():
    store = KeyStore([KeyPolicy("team", hash_key("t"))], plain_keys=["alpha", "beta"])
    assert store.authenticate("alpha") == KeyPolicy("key-1", hash_key("alpha"))
    assert store.authenticate("beta").id == "key-2"
    assert store.authenticate("t").id == "team"
    assert "alpha" not in repr(vars(store))


def test_store_without_keys_is_disabled_and_refuses_everything():
    store = KeyStore()
    assert not store.enabled
    assert store.authenticate("anything") is None


def test_store_refuses_a_plain_key_that_repeats_a_file_key_or_an_empty_one():
    with pytest.raises(ConfigError, match="the same key"):
        KeyStore([KeyPolicy("a", hash_key("x"))], plain_keys=["x"])
    with pytest.raises(ConfigError, match="non-empty"):
        KeyStore(plain_keys=[""])


def test_allows_matches_the_name_and_its_versions_only():
    policy = KeyPolicy("a", DIGEST, models=["chat"])
    assert policy.allows("chat") and policy.allows("chat@v2")
    assert not policy.allows("code") and not policy.allows("chatty") and not policy.allows("code@chat")
    pinned = KeyPolicy("b", DIGEST, models=["chat@v1"])
    assert pinned.allows("chat@v1") and not pinned.allows("chat@v2") and not pinned.allows("chat")
    assert KeyPolicy("c", DIGEST).allows("anything")


# ----------------------------------------------------------------------------- quotas
def test_requests_per_minute_refuses_until_the_oldest_leaves_the_window():
    clock = FakeClock()
    quota = QuotaTracker(clock)
    policy = KeyPolicy("a", DIGEST, requests_per_minute=2)
    quota.acquire(policy, 0).release()
    clock.advance(10)
    quota.acquire(policy, 0).release()
    clock.advance(5)
    with pytest.raises(QuotaExceeded) as info:
        quota.acquire(policy, 0)
    assert info.value.retry_after == pytest.approx(45.0)
    assert info.value.limit == "requests_per_minute" and not info.value.never_fits
    assert info.value.reason == "requests_per_minute limit of 2 reached for key 'a'"
    clock.advance(45)  # the first request is exactly 60 s old: out of the window
    quota.acquire(policy, 0).release()
    with pytest.raises(QuotaExceeded) as info:
        quota.acquire(policy, 0)
    assert info.value.retry_after == pytest.approx(10.0)


def test_tokens_per_minute_waits_until_enough_tokens_leave():
    clock = FakeClock()
    quota = QuotaTracker(clock)
    policy = KeyPolicy("a", DIGEST, tokens_per_minute=100)
    for tokens in (30, 30, 30):
        quota.acquire(policy, tokens).release()
        clock.advance(10)
    quota.acquire(policy, 10).release()  # 100 exactly: still fits
    with pytest.raises(QuotaExceeded) as info:
        quota.acquire(policy, 50)  # needs 50 free: the first two (t=0, t=10) must leave
    assert info.value.retry_after == pytest.approx(40.0)  # 10 + 60 - 30
    assert info.value.limit == "tokens_per_minute" and not info.value.never_fits
    clock.advance(39.5)
    with pytest.raises(QuotaExceeded):
        quota.acquire(policy, 50)
    clock.advance(0.5)
    quota.acquire(policy, 50).release()
    assert quota.usage("a").tokens_in_window == 30 + 10 + 50


def test_tokens_retry_after_when_exactly_enough_tokens_leave():
    clock = FakeClock()
    quota = QuotaTracker(clock)
    policy = KeyPolicy("a", DIGEST, tokens_per_minute=100)
    for tokens in (30, 30, 40):  # at t = 0, 10, 20
        quota.acquire(policy, tokens).release()
        clock.advance(10)
    with pytest.raises(QuotaExceeded) as info:
        quota.acquire(policy, 60)  # the first two free exactly 60
    assert info.value.retry_after == pytest.approx(40.0)


def test_lowered_request_limit_waits_for_enough_requests_to_leave():
    clock = FakeClock()
    quota = QuotaTracker(clock)
    for _ in range(3):  # at t = 0, 10, 20 under a limit of 3
        quota.acquire(KeyPolicy("a", DIGEST, requests_per_minute=3), 0).release()
        clock.advance(10)
    with pytest.raises(QuotaExceeded) as info:  # the keys file now says 2: two must leave
        quota.acquire(KeyPolicy("a", DIGEST, requests_per_minute=2), 0)
    assert info.value.retry_after == pytest.approx(40.0)


def test_request_larger_than_the_whole_limit_never_fits():
    quota = QuotaTracker(FakeClock())
    policy = KeyPolicy("a", DIGEST, tokens_per_minute=100)
    with pytest.raises(QuotaExceeded) as info:
        quota.acquire(policy, 101)
    assert info.value.never_fits and info.value.retry_after == 60.0
    assert "never fit" in info.value.reason
    assert quota.usage("a").requests_in_window == 0  # nothing recorded


def test_max_concurrent_counts_open_leases_and_release_is_idempotent():
    quota = QuotaTracker(FakeClock())
    policy = KeyPolicy("a", DIGEST, max_concurrent=2)
    first, second = quota.acquire(policy, 1), quota.acquire(policy, 1)
    with pytest.raises(QuotaExceeded) as info:
        quota.acquire(policy, 1)
    assert info.value.limit == "max_concurrent" and info.value.retry_after == pytest.approx(1.0)
    first.release()
    first.release()  # a second release must not free a second slot
    third = quota.acquire(policy, 1)
    with pytest.raises(QuotaExceeded):
        quota.acquire(policy, 1)
    assert quota.usage("a").open_requests == 2
    second.release()
    third.release()
    assert quota.usage("a").open_requests == 0


def test_release_corrects_the_token_estimate_to_actual_usage():
    clock = FakeClock()
    quota = QuotaTracker(clock)
    policy = KeyPolicy("a", DIGEST, tokens_per_minute=1000)
    lease = quota.acquire(policy, 900)  # prompt + max_tokens
    with pytest.raises(QuotaExceeded):
        quota.acquire(policy, 200)
    lease.release(actual_tokens=150)
    lease.release(actual_tokens=999)  # ignored: already released
    assert quota.usage("a").tokens_in_window == 150
    quota.acquire(policy, 850).release()
    assert quota.usage("a").tokens_in_window == 1000


def test_release_after_the_request_left_the_window_changes_nothing():
    clock = FakeClock()
    quota = QuotaTracker(clock)
    policy = KeyPolicy("a", DIGEST, tokens_per_minute=1000)
    lease = quota.acquire(policy, 500)
    clock.advance(61)
    quota.acquire(policy, 100).release()
    lease.release(actual_tokens=900)
    assert quota.usage("a").tokens_in_window == 100


def test_release_refuses_a_negative_token_count():
    lease = QuotaTracker(FakeClock()).acquire(KeyPolicy("a", DIGEST), 1)
    with pytest.raises(ValueError, match="actual_tokens"):
        lease.release(actual_tokens=-1)
    assert not lease.released


def test_keys_are_counted_separately_and_unlimited_keys_keep_no_window():
    quota = QuotaTracker(FakeClock())
    a, b = KeyPolicy("a", DIGEST, requests_per_minute=1), KeyPolicy("b", hash_key("b"), requests_per_minute=1)
    quota.acquire(a, 0).release()
    quota.acquire(b, 0).release()
    with pytest.raises(QuotaExceeded):
        quota.acquire(a, 0)
    free = KeyPolicy("free", hash_key("free"))
    for _ in range(1000):
        quota.acquire(free, 10).release()
    assert quota.usage("free").requests_in_window == 0


def test_memory_stays_bounded_as_the_window_slides():
    clock = FakeClock()
    quota = QuotaTracker(clock)
    policy = KeyPolicy("a", DIGEST, tokens_per_minute=10**9)
    for _ in range(600):
        quota.acquire(policy, 1).release()
        clock.advance(1)
    state = quota._states["a"]
    assert len(state.entries) == 60 and state.tokens == 60
    clock.advance(60)
    assert quota.usage("a") == QuotaUsage(0, 0, 0)
    assert "a" not in quota._states


def test_lease_as_context_manager_releases():
    quota = QuotaTracker(FakeClock())
    policy = KeyPolicy("a", DIGEST, max_concurrent=1)
    with quota.acquire(policy, 1):
        with pytest.raises(QuotaExceeded):
            quota.acquire(policy, 1)
    quota.acquire(policy, 1)


def test_threads_acquiring_and_releasing_keep_counts_consistent():
    """A smoke test: lost updates would break the totals; the GIL makes a race rare anyway."""
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often so that a missing lock shows
    try:
        _hammer()
    finally:
        sys.setswitchinterval(old_interval)


def _hammer() -> None:
    quota = QuotaTracker()
    policy = KeyPolicy("a", DIGEST, max_concurrent=3, tokens_per_minute=10**9)
    admitted, refused, peak = [], [], []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(200):
            try:
                lease = quota.acquire(policy, 2)
            except QuotaExceeded:
                with lock:
                    refused.append(1)
                continue
            peak.append(quota.usage("a").open_requests)
            lease.release(actual_tokens=1)
            with lock:
                admitted.append(1)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) + len(refused) == 8 * 200
    assert max(peak) <= 3
    usage = quota.usage("a")
    assert usage.open_requests == 0
    assert usage.requests_in_window == len(admitted) and usage.tokens_in_window == len(admitted)


# ----------------------------------------------------------------------------- CLI
def test_cli_keys_add_prints_the_key_once_and_stores_its_hash(tmp_path, capsys):
    path = tmp_path / "keys.json"
    rc = main(["keys", "add", "--file", str(path), "--id", "team-a", "--requests-per-minute", "60",
               "--tokens-per-minute", "20000", "--max-concurrent", "4", "--model", "chat", "--model", "code"])
    out, err = capsys.readouterr()
    assert rc == 0
    key = out.strip()
    assert key.startswith("fi-") and "\n" not in key
    assert "only once" in err and "hash" in err and key not in err
    [policy] = load_keys_file(path)
    assert policy == KeyPolicy("team-a", hash_key(key), 60, 20000, 4, ("chat", "code"))
    assert key not in path.read_text()


def test_cli_keys_add_duplicate_id_fails_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "keys.json"
    assert main(["keys", "add", "--file", str(path), "--id", "a"]) == 0
    capsys.readouterr()
    assert main(["keys", "add", "--file", str(path), "--id", "a"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "already exists" in err
    assert len(load_keys_file(path)) == 1


def test_cli_keys_add_refuses_a_zero_limit_at_parse_time(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["keys", "add", "--file", str(tmp_path / "k.json"), "--id", "a", "--max-concurrent", "0"])
    assert info.value.code == 2
    assert "--max-concurrent" in capsys.readouterr().err
    assert not (tmp_path / "k.json").exists()
