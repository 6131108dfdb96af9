from pathlib import Path

import pytest

from zimage_worker.preload import preload
from zimage_worker.settings import WorkerSettings


def test_builtin_models_need_no_download(tmp_path: Path) -> None:
    assert preload(WorkerSettings(model_source="tiny-random", models_dir=str(tmp_path))) is None


def test_already_cached_model_is_not_fetched_again(tmp_path: Path) -> None:
    cached = tmp_path / "Tongyi-MAI" / "Z-Image-Turbo"
    cached.mkdir(parents=True)
    assert preload(WorkerSettings(model_source="Tongyi-MAI/Z-Image-Turbo", models_dir=str(tmp_path))) == cached


def test_missing_models_dir_is_a_clear_error() -> None:
    with pytest.raises(SystemExit, match="MODELS_DIR"):
        preload(WorkerSettings(model_source="Tongyi-MAI/Z-Image-Turbo", models_dir=None))
