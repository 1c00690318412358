"""What every benchmark row scores, and how much work that is.

One checkpoint; queries with N items each; the checkpoint's instruction padded (or emptied) to an
exact token length. Everything is encoded once with darl_infer's own template, so every row, peer
or darl_infer backend, scores the very same token ids (prefix + suffix per pair).

Queries and items are real Home Depot search data (../shared/data/homedepot/dev.jsonl) when
present, else synthetic text of the same lengths (3-word queries, 12-word items).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from pathlib import Path

import torch

from darl_infer.atomic import atomic_dir
from darl_infer.checkpoint import CheckpointSpec

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "homedepot" / "dev.jsonl"
CACHE = Path.home() / ".cache" / "darl_infer" / "bench"
FILLER = " Read the query and the item carefully, consider the intent of the user and the attributes of the item."
SYNTHETIC_WORDS = (
    "cordless drill steel pipe white paint brush light bulb door handle tile floor wood deck screw "
    "outdoor garden hose kitchen faucet chrome cabinet shelf ceiling fan bathroom vanity led lamp"
).split()


def texts(n_queries: int, n_items: int, seed: int = 0) -> tuple[list[tuple[str, list[str]]], str]:
    """(query, items) pairs and a description of where the text came from."""
    rng = random.Random(seed)
    if DATA.is_file():
        rows = [json.loads(line) for line in DATA.open()]
        queries = rng.sample(sorted({r["query"] for r in rows}), n_queries)
        pool = sorted({r["item"] for r in rows})
        source = f"homedepot dev ({DATA.relative_to(DATA.parents[2])}): real queries, items drawn from its titles"
    else:
        words = lambda n: " ".join(rng.choice(SYNTHETIC_WORDS) for _ in range(n))  # noqa: E731
        queries = [words(3) for _ in range(n_queries)]
        pool = [words(12) for _ in range(4 * n_items)]
        source = "synthetic (no ../shared/data): 3-word queries, 12-word items"
    return [(q, rng.sample(pool, n_items)) for q in queries], source


def with_instruction(spec: CheckpointSpec, tokenizer, tokens: int) -> CheckpointSpec:
    """`spec` whose instruction is exactly `tokens` tokens: the checkpoint's own, cut or padded
    with a neutral sentence; 0 leaves no instruction (BOS + query label + query)."""
    text = spec.template.instruction
    while len(tokenizer(text, add_special_tokens=False).input_ids) < tokens + 8:
        text += FILLER
    ids = tokenizer(text, add_special_tokens=False).input_ids
    # decoding a cut and encoding it again can merge tokens differently: take the first cut that round-trips
    for cut in range(tokens, tokens + 8):
        candidate = tokenizer.decode(ids[:cut]) if cut else ""
        if len(tokenizer(candidate, add_special_tokens=False).input_ids) == tokens:
            return dataclasses.replace(spec, template=dataclasses.replace(spec.template, instruction=candidate))
    raise ValueError(f"cannot make an instruction of exactly {tokens} tokens")


@dataclasses.dataclass
class Case:
    """One instruction length: the template used and every query's encoding."""

    instruction_tokens: int
    template: dict
    queries: list[dict]  # {"query", "items", "prefix": [ids], "suffixes": [[ids]]}

    def pairs(self) -> list[list[int]]:
        """Every (prefix + suffix) sequence, query by query: what pairwise peers run."""
        return [q["prefix"] + s for q in self.queries for s in q["suffixes"]]

    def subset(self, n_queries: int, n_items: int) -> "Case":
        queries = [
            {"query": q["query"], "items": q["items"][:n_items], "prefix": q["prefix"], "suffixes": q["suffixes"][:n_items]}
            for q in self.queries[:n_queries]
        ]
        return Case(self.instruction_tokens, self.template, queries)


def build_cases(checkpoint: Path, tokenizer, instruction_tokens: list[int], n_queries: int, n_items: int, seed: int = 0):
    batch, source = texts(n_queries, n_items, seed)
    cases = []
    for tokens in instruction_tokens:
        spec = with_instruction(CheckpointSpec.load(checkpoint), tokenizer, tokens)
        encoder = spec.template.encoder(tokenizer)
        queries = []
        for query, items in batch:
            enc = encoder.encode(query, items)
            queries.append({"query": query, "items": items, "prefix": enc.prefix, "suffixes": enc.suffixes})
        cases.append(Case(tokens, spec.template.to_dict(), queries))
    return cases, source


# --- FLOPs -----------------------------------------------------------------------------------------
# Useful model FLOPs: 2 per multiply-add of every decoder Linear weight per token, plus attention
# (q.k and p.v: 4 * heads * head_dim per visible key per token per layer). Embedding lookups are no
# FLOPs; the K x hidden head and norms are negligible and left out. Pad tokens are not counted.


@dataclasses.dataclass(frozen=True)
class FlopModel:
    linear_params: int  # decoder Linear weights one token passes through (all layers)
    attention_per_key: int  # 4 * heads * head_dim
    windows: tuple  # per layer: sliding window or None

    @classmethod
    def of(cls, model) -> "FlopModel":
        decoder = getattr(model, model.base_model_prefix)
        linear = sum(m.weight.numel() for m in decoder.layers.modules() if isinstance(m, torch.nn.Linear))
        config = model.config
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(linear, 4 * config.num_attention_heads * head_dim, windows)

    def tokens(self, start: int, stop: int) -> int:
        """FLOPs of the tokens at positions start..stop-1 of one causal sequence."""
        flops = 2 * self.linear_params * (stop - start)
        for window in self.windows:
            for p in range(start, stop):
                flops += self.attention_per_key * (p + 1 if window is None else min(p + 1, window))
        return flops

    def shared_prefix(self, prefix_len: int, suffix_lens: list[int]) -> int:
        """darl_infer's work for one query: the prefix once, each item after it."""
        return self.tokens(0, prefix_len) + sum(self.tokens(prefix_len, prefix_len + s) for s in suffix_lens)

    def pairwise(self, prefix_len: int, suffix_lens: list[int]) -> int:
        """A pairwise scorer's work for one query: every pair from its first token."""
        return sum(self.tokens(0, prefix_len + s) for s in suffix_lens)


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 20) -> tuple[float, float]:
    """Best FLOP per wall-clock second and per CPU second of an n x n x n matmul in nn.Linear's
    layout (x @ w.T): on this CPU bf16 is several times faster in that layout than a plain a @ b,
    and it is the one models run. The best of 20: of 3 (until session 21) the bf16 peak at 1024³
    read 1,510-1,690 GFLOP per CPU second on one machine, of 50 1,730."""
    x, w = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.nn.functional.linear(x, w)
    wall = cpu = float("inf")
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        torch.nn.functional.linear(x, w)
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return 2 * n**3 / wall, 2 * n**3 / cpu


# --- derived model files, cached per checkpoint ----------------------------------------------------


def checkpoint_cache(checkpoint: Path) -> Path:
    """~/.cache/darl_infer/bench/<name>-<digest of what the weights depend on>: never in the repo.

    darl.json counts by its base model and labels only: its evaluation table may be rewritten
    after training without changing a weight."""
    spec = CheckpointSpec.load(checkpoint)
    digest = hashlib.sha256(json.dumps([spec.base_model, spec.labels]).encode())
    for f in sorted(checkpoint.iterdir()):
        if f.is_file() and f.name != "darl.json":
            digest.update(f"{f.name} {f.stat().st_size} {f.stat().st_mtime_ns}\n".encode())
    return CACHE / f"{checkpoint.resolve().name}-{digest.hexdigest()[:16]}"


def merged_hf_folder(checkpoint: Path) -> Path:
    """A plain HF folder of `checkpoint` (adapter merged, score head in) for the peers that load one."""
    out = checkpoint_cache(checkpoint) / "hf"
    if not (out / "config.json").is_file():
        from darl_infer.loading import load_checkpoint_model

        spec = CheckpointSpec.load(checkpoint)
        model, tokenizer = load_checkpoint_model(checkpoint, spec, torch.float32, torch.device("cpu"))
        with atomic_dir(out, replace=True) as partial:
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
    return out


def darl_onnx_export(checkpoint: Path, int8: bool = False) -> Path:
    """darl_infer's own ONNX export (prefix graph + items graph) of `checkpoint`."""
    out = checkpoint_cache(checkpoint) / ("darl-onnx-int8" if int8 else "darl-onnx")
    if not out.is_dir():
        from darl_infer.backends.onnx_export import export

        export(checkpoint, out, int8=int8)
    return out
