"""LoRA adapters, the parts without a model: adapter sets and batch keys, the affinity order, where an adapter's
weights come from, and the worker's settings (no torch, no download)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from zimage_queue import GenerationParams
from zimage_queue.message import AdapterSpec, LoraRef
from zimage_worker import affinity
from zimage_worker.adapters import resolve_adapter_source
from zimage_worker.engine import NoopEngine, adapter_set, batch_key
from zimage_worker.settings import WorkerSettings

SCALES = {"pixel": 0.8, "ink": 1.0}


def params(loras: list[tuple[str, float | None]] | None = None, **kw: Any) -> GenerationParams:
    refs = None if loras is None else [LoraRef(name=n, scale=s) for n, s in loras]
    values: dict[str, Any] = {"prompt": "a fox", "width": 64, "height": 64, "steps": 2, "seed": 1, **kw}
    return GenerationParams(loras=refs, **values)


# -- adapter sets and batch keys ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("loras", "expected"),
    [
        (None, ()),
        ([], ()),
        ([("pixel", None)], (("pixel", 0.8),)),  # the adapter's defaultScale
        ([("pixel", 0.3)], (("pixel", 0.3),)),
        ([("ink", 0.5), ("pixel", None)], (("ink", 0.5), ("pixel", 0.8))),
        ([("pixel", None), ("ink", 0.5)], (("ink", 0.5), ("pixel", 0.8))),  # order does not matter
        ([("other", None)], (("other", 1.0),)),  # unknown here: the engine refuses it when the job runs
        ([("pixel", 0)], (("pixel", 0.0),)),
    ],
)
def test_adapter_set_resolves_scales(loras: list[tuple[str, float | None]] | None, expected: Any) -> None:
    assert adapter_set(params(loras), SCALES) == expected


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (None, None, True),
        (None, [], True),
        ([("pixel", None)], [("pixel", 0.8)], True),  # a default resolved equals the same scale given
        ([("pixel", 1.0), ("ink", 1.0)], [("ink", None), ("pixel", 1.0)], True),
        (None, [("pixel", None)], False),
        ([("pixel", 0.5)], [("pixel", 0.8)], False),  # another scale: another call
        ([("pixel", 0.8)], [("ink", 0.8)], False),
        ([("pixel", 0.8)], [("pixel", 0.8), ("ink", 1.0)], False),
    ],
)
def test_batch_key_separates_adapter_sets_and_scales(
    a: list[tuple[str, float | None]] | None, b: list[tuple[str, float | None]] | None, same: bool
) -> None:
    assert (batch_key(params(a), "turbo", SCALES) == batch_key(params(b), "turbo", SCALES)) is same


def test_batch_key_with_adapters_keeps_its_other_rules() -> None:
    base = params([("pixel", None)])
    assert batch_key(base, "turbo", SCALES) == batch_key(params([("pixel", None)], seed=9), "turbo", SCALES)
    assert batch_key(base, "turbo", SCALES) != batch_key(params([("pixel", None)], width=96), "turbo", SCALES)
    image = params([("pixel", None)], task="image-to-image", input_image="s3://b/k.png")
    assert batch_key(image, "turbo", SCALES) is None


def test_noop_engine_ignores_loras() -> None:
    engine = NoopEngine()
    p = params([("pixel", 2.0)])
    [image] = engine.generate(p, on_step=lambda s, t: None, should_stop=lambda: False, load_image=lambda u: b"")
    [plain] = engine.generate(params(), on_step=lambda s, t: None, should_stop=lambda: False, load_image=lambda u: b"")
    assert image.tobytes() == plain.tobytes()
    assert batch_key(p, "turbo") != batch_key(params(), "turbo")  # still its own batch


# -- affinity ----------------------------------------------------------------------------------------------------
A = (("a", 1.0),)
B = (("b", 1.0),)
C = (("c", 0.5),)
BASE: tuple[tuple[str, float], ...] = ()


def groups(*spec: tuple[Any, float, int]) -> list[affinity.Group[str]]:
    """(adapter set, since, passed) per group, in arrival order."""
    return [affinity.Group(("k", i), s, [f"j{i}"], since, passed, seq=i) for i, (s, since, passed) in enumerate(spec)]


@pytest.mark.parametrize(
    ("spec", "active", "resident", "now", "expected", "why"),
    [
        ([(A, 0, 0)], A, [], 0.1, 0, "one group"),
        ([(B, 0, 0), (A, 0, 0)], A, ["a"], 0.1, 1, "the active set first"),
        ([(B, 0, 0), (A, 0.05, 0)], A, ["a"], 0.1, 1, "the active set even when newer"),
        ([(B, 0, 0), (C, 0, 0), (A, 0, 0)], BASE, ["c"], 0.1, 1, "then one whose adapters are loaded"),
        ([(B, 0, 0), (BASE, 0.02, 0)], A, ["a"], 0.1, 1, "the base model needs no load"),
        ([(B, 0.01, 0), (C, 0, 0)], A, ["a"], 0.1, 1, "else the oldest"),
        ([(B, 0, 0), (A, 0.5, 0)], A, ["a"], 2.0, 0, "B has waited max_wait: due, before the active set"),
        ([(B, 0.5, 0), (C, 0, 0), (A, 0, 0)], A, ["a"], 2.2, 1, "due ones: the oldest first"),
        ([(B, 1.9, 3), (A, 1.9, 0)], A, ["a"], 2.0, 0, "passed over max_passes times: due"),
        ([(B, 1.9, 2), (A, 1.9, 0)], A, ["a"], 2.0, 1, "not yet"),
        ([(B, 0, 0), (A, 0, 0)], None, [], 0.1, 0, "an engine without adapters: arrival order"),
    ],
)
def test_pick(
    spec: list[tuple[Any, float, int]], active: Any, resident: list[str], now: float, expected: int, why: str
) -> None:
    assert affinity.pick(groups(*spec), active, resident, now, max_wait_s=2.0, max_passes=3) == expected, why


def test_pick_without_affinity_is_arrival_order() -> None:
    assert affinity.pick(groups((B, 0, 0), (A, 0, 0)), A, ["a"], 0.1, max_wait_s=0, max_passes=3) == 0


def test_add_fills_groups_of_one_key_up_to_the_batch_size() -> None:
    held = affinity.add([], [(("k", A), A, "1"), (("k", B), B, "2"), (None, A, "3")], now=1.0, max_size=2)
    held = affinity.add(held, [(("k", A), A, "4"), (("k", A), A, "5"), (None, A, "6")], now=2.0, max_size=2)
    assert [(g.key, g.jobs, g.since) for g in held] == [
        (("k", A), ["1", "4"], 1.0),  # joined the held group: it keeps its age
        (("k", B), ["2"], 1.0),
        (None, ["3"], 1.0),  # no key: alone
        (("k", A), ["5"], 2.0),  # the first was full
        (None, ["6"], 2.0),
    ]
    assert [g.seq for g in held] == [0, 1, 2, 3, 4]


def test_no_group_waits_past_the_bound_however_the_active_set_keeps_coming() -> None:
    """A stream of jobs of the active set (two a call) with one job of another set held: that job runs once it is
    due, by time or by passes, whichever comes first."""
    for max_wait_s, max_passes, expect_run_at in [(0.35, 100, 4), (100.0, 2, 2)]:
        held = affinity.add([], [(("k", B), B, "b")], now=0.0, max_size=2)
        ran: list[str] = []
        for call in range(10):
            now = call * 0.1
            held = affinity.add(held, [(("k", A), A, f"a{call}"), (("k", A), A, f"a{call}'")], now, max_size=2)
            group, held = affinity.take_next(held, A, ["a"], now, max_wait_s, max_passes)
            ran.append(group.jobs[0])
        assert ran.index("b") == expect_run_at, (max_wait_s, max_passes, ran)


# -- sources -----------------------------------------------------------------------------------------------------
def spec(source: str, weight_name: str | None = None) -> AdapterSpec:
    return AdapterSpec(name="pixel", source=source, weight_name=weight_name)


def test_sources_local_paths_and_hub_ids(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "loras" / "pixel").mkdir(parents=True)
    (models / "loras" / "pixel" / "w.safetensors").write_bytes(b"x")
    (tmp_path / "abs.safetensors").write_bytes(b"x")
    (tmp_path / "outside").mkdir()
    kw: dict[str, Any] = {"models_dir": str(models), "cache_dir": str(tmp_path / "cache")}
    assert resolve_adapter_source(spec(str(tmp_path / "abs.safetensors")), **kw) == (str(tmp_path), "abs.safetensors")
    folder = str(models / "loras" / "pixel")
    assert resolve_adapter_source(spec(folder, "w.safetensors"), **kw) == (folder, "w.safetensors")
    assert resolve_adapter_source(spec("loras/pixel"), **kw) == (folder, None)  # under MODELS_DIR
    assert resolve_adapter_source(spec("loras/pixel/w.safetensors"), **kw) == (folder, "w.safetensors")
    # Not under MODELS_DIR (or climbing out of it): a hub id, passed on as it is.
    assert resolve_adapter_source(spec("owner/lora", "x.safetensors"), **kw) == ("owner/lora", "x.safetensors")
    assert resolve_adapter_source(spec("../outside"), **kw) == ("../outside", None)
    with pytest.raises(FileNotFoundError, match="pixel"):
        resolve_adapter_source(spec(str(tmp_path / "missing")), **kw)
    with pytest.raises(ValueError, match="unsupported source"):
        resolve_adapter_source(spec("https://example.com/w.safetensors"), **kw)


def test_uri_sources_are_fetched_once_into_the_cache(tmp_path: Path) -> None:
    fetched: list[str] = []

    def fetch(uri: str) -> bytes:
        fetched.append(uri)
        return b"weights of " + uri.encode()

    kw: dict[str, Any] = {"models_dir": None, "cache_dir": str(tmp_path / "cache"), "fetch": fetch}
    s3 = spec("s3://bucket/loras/pixel?endpoint=http://minio:9000", "w.safetensors")
    where, name = resolve_adapter_source(s3, **kw)
    assert name == "w.safetensors" and Path(where).is_relative_to(tmp_path / "cache")
    assert (
        Path(where) / name
    ).read_bytes() == b"weights of s3://bucket/loras/pixel/w.safetensors?endpoint=http://minio:9000"
    assert resolve_adapter_source(s3, **kw) == (where, name)  # from the cache
    one_file = spec("file:///srv/loras/ink.safetensors")
    where2, name2 = resolve_adapter_source(one_file, **kw)
    assert name2 == "ink.safetensors" and where2 != where
    assert fetched == ["s3://bucket/loras/pixel/w.safetensors?endpoint=http://minio:9000", one_file.source]


def test_file_uris_are_read_by_the_default_fetch(tmp_path: Path) -> None:
    (tmp_path / "w.safetensors").write_bytes(b"abc")
    where, name = resolve_adapter_source(
        spec((tmp_path / "w.safetensors").as_uri()), models_dir=None, cache_dir=str(tmp_path / "cache")
    )
    assert (Path(where) / name).read_bytes() == b"abc"


# -- settings ----------------------------------------------------------------------------------------------------
def test_settings_read_adapters_as_the_operator_writes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "ZIMAGE_ADAPTERS",
        json.dumps([{"name": "pixel", "source": "s3://b/p", "weightName": "w.safetensors", "defaultScale": 0.7}]),
    )
    monkeypatch.setenv("ZIMAGE_MAX_RESIDENT_ADAPTERS", "2")
    monkeypatch.setenv("ZIMAGE_ADAPTER_AFFINITY_MAX_WAIT_MS", "500")
    cfg = WorkerSettings()
    assert cfg.adapters == [
        AdapterSpec(name="pixel", source="s3://b/p", weight_name="w.safetensors", default_scale=0.7)
    ]
    assert (cfg.max_resident_adapters, cfg.adapter_affinity_max_wait_ms, cfg.adapter_affinity_max_passes) == (2, 500, 4)
    monkeypatch.delenv("ZIMAGE_ADAPTERS")
    assert WorkerSettings().adapters == []
