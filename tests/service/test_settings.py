import inspect

import pytest
from pydantic import ValidationError

from fewstep.service import settings as settings_module
from fewstep.service.settings import Settings


def test_defaults_are_valid_and_documented() -> None:
    s = Settings(_env_file=None)
    assert s.port == 8000 and s.max_n == 8 and s.redis_url is None and s.api_keys == []
    source = inspect.getsource(settings_module)
    for name in Settings.model_fields:
        assert f"    {name}:" in source
        after = source.split(f"    {name}:", 1)[1].split("\n", 2)[1]
        assert after.strip().startswith('"""'), f"{name} has no docstring"


def test_environment_overrides_with_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEWSTEP_MAX_N", "3")
    a, b, c = ("a" * 16, "b" * 20, "c" * 32)
    monkeypatch.setenv("FEWSTEP_API_KEYS", f"{a}, {b} ,,{c}")
    s = Settings()
    assert s.max_n == 3
    assert [k.get_secret_value() for k in s.api_keys] == [a, b, c]
    assert a not in repr(s.api_keys)


@pytest.mark.parametrize("var", ["FEWSTEP_API_KEYS", "FEWSTEP_ADMIN_KEYS"])
def test_short_keys_are_refused_naming_the_length_not_the_key(monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    monkeypatch.setenv(var, "long-enough-key-0123456789,short-key")
    with pytest.raises(ValidationError) as e:
        Settings()
    assert f"{var} has a key of 9 characters; keys must have at least 16 (`min_key_chars`)" in str(e.value)
    assert "short-key" not in str(e.value)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("FEWSTEP_MAX_N", "0"),
        ("FEWSTEP_PORT", "70000"),
        ("FEWSTEP_BACKEND", "magic"),
        ("FEWSTEP_THREADS", "0"),
        ("FEWSTEP_MAX_JOB_ITEMS", "0"),
        ("FEWSTEP_MAX_DELIVERIES", "0"),
        ("FEWSTEP_REDIS_PREFIX", "a b"),
        ("FEWSTEP_HEARTBEAT_S", "20"),
    ],
)
def test_invalid_values_fail_at_start_naming_the_setting(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError, match=f"(?i){var.removeprefix('FEWSTEP_')}"):
        Settings()


def test_redis_mode_moves_engines_out_of_the_gateway_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().embedded_workers == 1
    monkeypatch.setenv("FEWSTEP_REDIS_URL", "redis://127.0.0.1:6379/0")
    assert Settings().embedded_workers == 0
    monkeypatch.setenv("FEWSTEP_EMBEDDED_WORKERS", "2")
    assert Settings().embedded_workers == 2


def test_one_keys_caps_leave_half_of_each_lane_to_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """An item costs at least one evaluation, so a key capped at half a lane's depth in evaluations holds at most
    half its items: with the old defaults (256 evaluations, 256 items) one key filled the interactive lane."""
    s = Settings(_env_file=None)
    assert s.key_max_sync_cost <= s.max_queue // 2 and s.key_max_job_cost <= s.max_job_queue // 2
    monkeypatch.setenv("FEWSTEP_MAX_QUEUE", "40")
    assert Settings().key_max_sync_cost == 20  # unset: lowered to half of the lane
    monkeypatch.setenv("FEWSTEP_KEY_MAX_SYNC_COST", "21")
    with pytest.raises(ValidationError) as e:
        Settings()
    assert "FEWSTEP_KEY_MAX_SYNC_COST must be at most half of FEWSTEP_MAX_QUEUE (20)" in str(e.value)


def test_with_the_default_caps_one_key_cannot_fill_the_interactive_lane() -> None:
    from fewstep.engines.base import ImageItem
    from fewstep.errors import Overloaded
    from fewstep.service.queue.base import JobSpec
    from fewstep.service.queue.embedded import EmbeddedQueue
    from fewstep.service.queue.keys import BATCH, INTERACTIVE

    s = Settings(_env_file=None)
    queue = EmbeddedQueue({INTERACTIVE: s.max_queue, BATCH: s.max_job_queue})
    greedy = JobSpec(
        "greedy", "m", [ImageItem("p", seed=0, steps=1)] * s.max_n, INTERACTIVE, 600, owner_limit=s.key_max_sync_cost
    )
    with pytest.raises(Overloaded) as refused:
        for _ in range(s.max_queue):  # `n: 8, steps: 1` requests, as many as it can
            queue.submit(greedy)
    assert "`key_max_sync_cost`" in str(refused.value)
    other = JobSpec(
        "other", "m", [ImageItem("p", seed=0, steps=4)] * s.max_n, INTERACTIVE, 600, owner_limit=s.key_max_sync_cost
    )
    queue.submit(other)  # not "queue full"
    queue.close()


def test_the_engine_settings_old_name_is_still_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEWSTEP_ENGINE", "image")  # what deployments written before the rename set
    assert Settings().engine == "registry"
    monkeypatch.setenv("FEWSTEP_ENGINE", "unet")
    with pytest.raises(ValidationError, match="engine"):
        Settings()
