"""The `onnx` backend: ONNX Runtime runs an exported checkpoint (format: onnx_format.py).

The prefix graph runs once per query; its K/V stay in ONNX Runtime's memory (on the GPU with the
CUDA provider) and are bound as inputs of every items-graph call, one copy for all items.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..checkpoint import CheckpointError
from ..template import Encoded
from .chunking import length_sorted_chunks
from .onnx_format import GRAPH_IO, ITEMS_GRAPH, PREFIX_GRAPH, OnnxExport


def _providers(device: str | torch.device | None) -> list[str]:
    available = ort.get_available_providers()
    if device is None:  # CUDA when both onnxruntime-gpu and a GPU are there, else CPU
        use_cuda = "CUDAExecutionProvider" in available and torch.cuda.is_available()
    else:
        use_cuda = torch.device(device).type == "cuda"
        if use_cuda and "CUDAExecutionProvider" not in available:
            raise RuntimeError(f"device {device!r} needs onnxruntime-gpu; this onnxruntime has {available}")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]


def _session(path: Path, providers: list[str], threads: int, num_labels: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one chain of ops: parallelism is inside them
    options.intra_op_num_threads = threads  # 0: one per physical core
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # ORT raises several types (InvalidGraph, Fail, InvalidProtobuf, ...)
        raise CheckpointError(f"{path}: ONNX Runtime cannot load it ({e})") from None
    io = GRAPH_IO[path.name]
    names = {"inputs": [i.name for i in session.get_inputs()], "outputs": [o.name for o in session.get_outputs()]}
    if names != io:
        raise CheckpointError(f"{path}: graph inputs/outputs are {names}, expected {io}")
    if path.name == ITEMS_GRAPH and session.get_outputs()[0].shape[-1] != num_labels:
        raise CheckpointError(f"{path}: gives {session.get_outputs()[0].shape[-1]} grades, darl.json has {num_labels} labels")
    return session


class OnnxBackend:
    name = "onnx"

    def __init__(
        self, export: OnnxExport, token_budget: int = 2048, threads: int = 0, device: str | torch.device | None = None
    ):
        """`token_budget`: item tokens per items-graph call; `threads`: ONNX Runtime's intra-op
        threads, 0 for one per physical core (options are checked by the Scorer)."""
        self.token_budget = token_budget
        self.num_labels = export.num_labels
        self.providers = _providers(device)
        self.device_type = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.prefix_session = _session(export.directory / PREFIX_GRAPH, self.providers, threads, export.num_labels)
        self.items_session = _session(export.directory / ITEMS_GRAPH, self.providers, threads, export.num_labels)

    def _prefix_kv(self, prefix: list[int]) -> list[ort.OrtValue]:
        if not prefix:  # the template always puts at least the query's tokens in the prefix
            raise ValueError("empty prefix: the exported graphs need at least one prefix token")
        binding = self.prefix_session.io_binding()
        binding.bind_cpu_input("prefix_ids", np.array([prefix], dtype=np.int64))
        for name in GRAPH_IO[PREFIX_GRAPH]["outputs"]:
            binding.bind_output(name, self.device_type)  # stays where the items graph will read it
        self.prefix_session.run_with_iobinding(binding)
        return binding.get_outputs()

    def _items(self, suffixes: list[list[int]], prefix_kv: list[ort.OrtValue]) -> np.ndarray:
        lengths = np.array([len(s) for s in suffixes], dtype=np.int64)
        ids = np.zeros((len(suffixes), int(lengths.max())), dtype=np.int64)  # pads are hidden by causality
        for row, s in zip(ids, suffixes):
            row[: len(s)] = s
        binding = self.items_session.io_binding()
        binding.bind_cpu_input("item_ids", ids)
        binding.bind_cpu_input("item_lengths", lengths)
        binding.bind_ortvalue_input("prefix_k", prefix_kv[0])
        binding.bind_ortvalue_input("prefix_v", prefix_kv[1])
        binding.bind_output("probs", "cpu")
        self.items_session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def probs(self, enc: Encoded) -> torch.Tensor:
        out = torch.empty(len(enc.suffixes), self.num_labels)
        if not enc.suffixes:
            return out
        prefix_kv = self._prefix_kv(enc.prefix)
        for chunk in length_sorted_chunks([len(s) for s in enc.suffixes], self.token_budget):
            out[chunk] = torch.from_numpy(self._items([enc.suffixes[i] for i in chunk], prefix_kv))
        return out
