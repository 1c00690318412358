"""The `torch` backend: each prefix once, the items packed against their own prefix's KV copy,
then the fused classification head (final norm on the N last tokens only, projection, softmax).

Several queries at once (`probs_many`): the queries are taken in rounds whose distinct prefixes
fit the token budget; its queries' items run packed together in length-sorted chunks under the
budget, each item attending only to its own query's prefix K/V (prefix_runner.ItemsPass); the
round's prefixes not found in the LRU of recent prefixes run packed in the same forward pass as
its first chunk (prefix_runner.JointPass), one pass fewer than running them first.

HF's modules run the layers, with the attention swapped (attention_hook.py); on a GPU the fused
modules (fused_modules.py); on a CPU the attention by a C++ kernel (bf16 on AMX tiles where the CPU
has them), the fused attention modules and decoder layers (eager with the C++ norm, add-and-norm and
rotary kernels, kernels/*_cpu.cpp), in fp32 the fused MLPs with the C++ gated kernel, in bf16 HF's
MLPs with oneDNN's post-ops (onednn_mlp.py) and passes padded to few sizes (chunking.pass_size).
"""

from __future__ import annotations

import dataclasses
from itertools import accumulate

import torch

from darl_infer.kernels.classification_head import classification_head_reference
from darl_infer.kernels.cpu_extension import cpu_ops, has
from darl_infer.kernels.gated_activation import gated_activation_cpu, gated_activation_reference
from darl_infer.kernels.rms_norm import add_rms_norm_cpu, rms_norm_cpu
from darl_infer.kernels.rotary import rotary_cpu, rotary_reference
from darl_infer.kernels.shared_prefix_attention import shared_prefix_attention_cpu

from ..template import Encoded
from .sdpa_attention import shared_prefix_attention_sdpa
from .chunking import length_sorted_chunks, pass_size, prefix_rounds
from .compiled_layers import compile_decoder_layers, gated_activation_for_inductor
from .fused_modules import KNOWN_NORMS, ElementwiseOps, known_norm, use_fused_modules
from .onednn_mlp import use_onednn_mlps, used_for
from .prefix_cache import PrefixLRU
from .prefix_runner import PrefixKV, PrefixRunner
from .turns import TakingTurns

def final_norm_of(decoder: torch.nn.Module) -> tuple[torch.Tensor, float, str]:
    """(weight, eps, variant) of the decoder's final norm, for the fused head; an error rather than
    a guess for a norm the head does not know."""
    norm = getattr(decoder, "norm", None)
    if (known := known_norm(norm)) is None:
        names = ", ".join(name for _, name in KNOWN_NORMS)
        raise NotImplementedError(
            f"{type(decoder).__name__}.norm is {type(norm).__name__}; the fused classification head knows "
            f"only {names}. Use backend='reference' for this model."
        )
    variant, eps = known
    return norm.weight, eps, variant


# Tokens per forward pass when none is given. On a CPU a pass costs about in proportion to its
# tokens, but oneDNN's bf16 matmuls run faster on more rows: 4096 rather than 2048 is 9-12 % faster
# in bf16 at 100 and 300 items a query, 8192 no faster (fp32 within 3 %; 2-core AMX Xeon,
# bench/cpu_kernels.py --kernel budget, bench/RESULTS.md). On a GPU a pass costs ~20 ms of host
# time (kernel launches) whatever its size up to tens of thousands of tokens (H200, gemma3-270m
# shapes, 1,000 items of a query: 86 ms at 16,384 tokens a pass, 65.5 ms at 65,536).
DEFAULT_TOKEN_BUDGET = {"cpu": 4096, "cuda": 65536}


class TorchBackend:
    name = "torch"
    # PyTorch's fused SDPA: the reference's math (tests/test_sdpa_attention.py) without its
    # separate scale / mask / softmax passes and fp32 round trips (bench/RESULTS.md, issue 16). On a
    # CPU the C++ kernel instead (kernels/shared_prefix_attention_cpu.cpp; bench/cpu_kernels.py, a
    # 100-item query on a 2-core Xeon: fp32 -3 % eager and -9 % compiled, bf16 -4 %)
    attention_op = staticmethod(shared_prefix_attention_sdpa)
    head_op = staticmethod(classification_head_reference)
    # between the matmuls of the fused q/k/v and gate/up projections (fused_modules.py); HF's norms
    elementwise_ops = ElementwiseOps(rotary=rotary_reference, gated=gated_activation_reference)
    # on a CPU eager the C++ kernels (kernels/*_cpu.cpp), compiled the rotary's reference for
    # inductor to fuse (with the norms, and HF's MLPs: it fuses their activation and product)
    cpu_elementwise_ops = ElementwiseOps(
        rotary=rotary_cpu, gated=gated_activation_cpu, rms_norm=rms_norm_cpu, add_rms_norm=add_rms_norm_cpu
    )
    compiled_cpu_elementwise_ops = ElementwiseOps(rotary=rotary_reference, gated=None)

    def __init__(self, model, token_budget: int | None = None, compile: bool = False):
        """`token_budget`: tokens per forward pass: the items of one pass, the distinct prefixes of
        one prefix pass (a longer item or prefix runs alone); None: the device's
        DEFAULT_TOKEN_BUDGET. `compile`: the decoder layers under torch.compile, in place
        (compiled_layers.py; faster in bf16, the first call compiles). Concurrent calls take turns
        at the model, one forward pass at a time, handed over between layers to the call with the
        least work left (turns.py): a small call does not wait for a large one, and threads never
        run the model side by side (with compile=True they must not: a new input shape recompiles
        and tracing is not thread-safe; Hugging Face's `kernels` keeps the rotary function's state
        in a global while dynamo traces, tests/test_compiled_layers.py). Options are checked by the
        Scorer."""
        if getattr(model.score, "bias", None) is not None:
            raise NotImplementedError("a classification head with a bias is not supported; use backend='reference'")
        self.model = model
        self.device = model.device
        self.compiled = compile
        self.token_budget = token_budget if token_budget is not None else DEFAULT_TOKEN_BUDGET.get(self.device.type, 4096)
        decoder = getattr(model, model.base_model_prefix)
        self.fused_projections, ops = [], None
        if self.uses_fused_modules():
            ops = self.fused_module_ops()
            self.fused_projections = use_fused_modules(decoder, ops)
        if self.device.type == "cpu" and (ops is None or ops.gated is None):
            use_onednn_mlps(decoder)  # HF's MLP modules, in bf16
        if self.uses_cpu_kernels() and has("shared_prefix_attention"):
            self.attention_op = shared_prefix_attention_cpu
        if compile:
            compile_decoder_layers(decoder)
        # bf16 on a CPU that runs it natively: oneDNN's matmuls, built for each new number of rows
        # (~40 ms a pass the first time), so passes are padded to few sizes (chunking.pass_size; 16
        # new 100-item queries: mean 320-330 -> 285 ms, 2-core AMX Xeon, bench/cpu_variants.py). fp32
        # runs MKL's matmuls, which take any size as it comes (padded: 4.5 % slower)
        self.pads_passes = self.device.type == "cpu" and used_for(model.dtype)
        self.turns = TakingTurns()
        self.layers = model.config.num_hidden_layers
        self.norm_weight, self.norm_eps, self.norm_variant = final_norm_of(decoder)
        # the head applies the final norm, to the last token of each item only
        self.runner = PrefixRunner(decoder, self.attention_op, final_norm=False)
        # The head op also returns sum_k p_k * v_k; it is given the grade indices 0..K-1 and its
        # result goes unused: the Scorer weighs the probabilities with the checkpoint's grade values.
        self.grade_indices = torch.arange(model.config.num_labels, dtype=torch.float32, device=self.device)

    def uses_cpu_kernels(self) -> bool:
        """The C++ CPU kernels (kernels/*_cpu.cpp) run this backend's attention and elementwise work:
        on a CPU, for a fp32 or bf16 model, where they are built."""
        return self.device.type == "cpu" and self.model.dtype in (torch.float32, torch.bfloat16) and cpu_ops() is not None

    def uses_fused_modules(self) -> bool:
        """One matmul for q/k/v (and on a GPU one for gate/up; fused_modules.py): on a GPU, where a
        pass is bound by its kernel launches; on a CPU eager with the C++ kernels between the
        matmuls, and compiled (bf16, 100-item queries on a 2-core AMX Xeon: eager -7 %, compiled -5 %;
        bench/cpu_kernels.py --kernel layers, bench/RESULTS.md)."""
        return self.device.type == "cuda" or self.compiled or self.uses_cpu_kernels()

    def fused_module_ops(self) -> ElementwiseOps:
        """The ops between the fused modules' matmuls: on a GPU `elementwise_ops` (compiled, Gemma's
        GELU in the form inductor runs fast); on a CPU eager the C++ kernels, compiled the rotary's
        PyTorch reference for inductor to fuse. gated None: the MLPs stay HF's modules, on a CPU in
        bf16 with oneDNN's post-ops (onednn_mlp.py: as fast there as one gate/up matmul and the C++
        gated kernel, and closer to fp32; in fp32 that matmul and kernel are 5-15 % faster a 100-item
        query than HF's MLPs, 2-core AMX Xeon, bench/cpu_variants.py)."""
        if self.device.type != "cpu":
            if self.compiled:
                return dataclasses.replace(self.elementwise_ops, gated=gated_activation_for_inductor)
            return self.elementwise_ops
        if not self.compiled and self.uses_cpu_kernels():
            if used_for(self.model.dtype):
                return dataclasses.replace(self.cpu_elementwise_ops, gated=None)
            return self.cpu_elementwise_ops
        return self.compiled_cpu_elementwise_ops

    def head(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Grade probabilities (N, K) from the packed pre-norm hidden states of N items."""
        probs, _ = self.head_op(
            hidden, cu_seqlens, self.norm_weight, self.norm_eps, self.norm_variant, self.model.score.weight,
            self.grade_indices,
        )
        return probs

    @torch.inference_mode()
    def probs_many(self, encoded: list[Encoded], lru: PrefixLRU | None = None) -> list[torch.Tensor]:
        """Grade probabilities (N_q, K) of each encoded query's items; `lru`: recent prefixes to
        reuse and to keep (None: none)."""
        tokens = sum(len(enc.prefix) + sum(map(len, enc.suffixes)) for enc in encoded if enc.suffixes)
        with self.turns.call(tokens * self.layers):
            for projection in self.fused_projections:
                projection.refresh()
            return self._probs_many(encoded, lru)

    def _probs_many(self, encoded: list[Encoded], lru: PrefixLRU | None) -> list[torch.Tensor]:
        sizes = [len(enc.suffixes) for enc in encoded]
        first_row = list(accumulate([0, *sizes]))  # each query's rows in `probs`, all queries back to back
        probs = torch.empty(first_row[-1], self.model.config.num_labels)
        queries = [n for n, size in enumerate(sizes) if size]  # a query without items needs no prefix
        for round_ in prefix_rounds([encoded[n].prefix for n in queries], self.token_budget):
            in_round = [queries[i] for i in round_]
            keys = [(tuple(encoded[n].prefix), self.model.dtype, self.device) for n in in_round]
            found: dict[tuple, PrefixKV] = {}
            for key in dict.fromkeys(keys):
                if lru is not None and (kv := lru.get(key)) is not None:
                    found[key] = kv
            missing = [key for key in dict.fromkeys(keys) if key not in found]  # run with the first chunk
            items = [  # (its prefix's key, its row in `probs`, its ids)
                (key, first_row[n] + i, ids)
                for n, key in zip(in_round, keys)
                for i, ids in enumerate(encoded[n].suffixes)
            ]
            for chunk in length_sorted_chunks([len(ids) for _, _, ids in items], self.token_budget):
                by_prefix: dict[tuple, list[tuple[int, list[int]]]] = {}  # each prefix's items contiguous in the row
                for j in chunk:
                    key, row, ids = items[j]
                    by_prefix.setdefault(key, []).append((row, ids))
                groups = [  # a prefix not yet computed is named by its index in `missing`
                    (found[key] if key in found else missing.index(key), [torch.tensor(ids) for _, ids in members])
                    for key, members in by_prefix.items()
                ]
                rows = [row for members in by_prefix.values() for row, _ in members]
                if self.pads_passes:  # an item of filler tokens, its grades dropped: a pass of few sizes
                    tokens = sum(len(key[0]) for key in missing) + sum(len(items[j][2]) for j in chunk)
                    if filler := pass_size(tokens, self.token_budget) - tokens:
                        groups[-1][1].append(torch.zeros(filler, dtype=torch.long))
                if missing:  # the round's new prefixes in the same forward pass as its first chunk
                    computed, hidden, cu = self.runner.packed_with_prefixes(
                        [torch.tensor(ids) for ids, _, _ in missing], groups
                    )
                    for key, kv in zip(missing, computed):
                        found[key] = kv
                        if lru is not None:
                            lru.put(key, kv)
                    missing = []
                else:
                    hidden, cu = self.runner.packed(groups)
                probs[rows] = self.head(hidden, cu)[: len(rows)].cpu()
        return list(probs.split(sizes))
