"""Export a DaRL checkpoint to two ONNX graphs that keep the prefix computed once per query
(the folder's format: onnx_format.py).

The HF model runs unchanged; only its attention is swapped, through the attention hook
(attention_hook.py), for an export-friendly padded variant of the shared-prefix attention in
kernels/shared_prefix_attention.py (the packed torch op uses data-dependent shapes that do not
export): every item token attends to the one prefix copy in a single matmul and to its own
causal keys, and the two halves are merged by log-sum-exp. The head (gather the last real token,
score Linear, softmax, expected grade) is fused into the items graph.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from darl_infer.kernels.shared_prefix_attention import _partial_attention

from ..atomic import atomic_dir
from ..checkpoint import SPEC_FILE, CheckpointError, CheckpointSpec, read_spec, resolve_checkpoint
from ..loading import load_checkpoint_model
from .attention_hook import active, use_attention_hook
from .onnx_backend import OnnxBackend
from .onnx_format import (
    GRAPH_IO, ITEMS_GRAPH, ONNX_FORMAT_VERSION, ONNX_SECTION, PREFIX_GRAPH, OnnxExport, is_onnx_export, sha256,
)
from .reference import ReferenceBackend

OPSET = 18


def padded_shared_prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of right-padded items that all continue one prefix; returns (N, L, H, D).

    q (N, H, L, D), k and v (N, Hkv, L, D) in HF's layout; token t of every item sits at absolute
    position P + t. prefix_k, prefix_v (P, Hkv, D): one copy for all items, or None (no prefix).
    Pad tokens need no mask: they come after every real token, so causality hides them.
    Same math as `shared_prefix_attention_reference`, padded instead of packed.
    """
    N, H, L, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    out_dtype = q.dtype
    q, k, v = q.float().reshape(N, Hkv, G, L, D), k.float()[:, :, None], v.float()[:, :, None]
    pos = torch.arange(L, device=q.device)

    # each item against its own keys, causal: (N, Hkv, G, L, L)
    s_own = (q @ k.transpose(-1, -2)) * scale
    visible = pos[None, :] <= pos[:, None]
    if sliding_window is not None:
        visible = visible & (pos[None, :] > pos[:, None] - sliding_window)
    o_own, lse_own = _partial_attention(s_own.masked_fill(~visible, float("-inf")), v)
    if prefix_k is None:
        return o_own.reshape(N, H, L, D).transpose(1, 2).to(out_dtype)

    # all item queries against the one prefix copy, one matmul: (Hkv, N*G*L, D) @ (Hkv, D, P)
    P = prefix_k.shape[0]
    qp = q.permute(1, 0, 2, 3, 4).reshape(Hkv, N * G * L, D)
    s_pre = (qp @ prefix_k.float().permute(1, 2, 0)) * scale
    if sliding_window is not None:
        key_pos = torch.arange(P, device=q.device)
        visible = key_pos[None, :] > (P + pos)[:, None] - sliding_window  # (L, P)
        s_pre = s_pre.view(Hkv, N * G, L, P).masked_fill(~visible, float("-inf")).view(Hkv, N * G * L, P)
    o_pre, lse_pre = _partial_attention(s_pre, prefix_v.float().permute(1, 0, 2))
    o_pre = o_pre.view(Hkv, N, G, L, D).transpose(0, 1)
    lse_pre = lse_pre.view(Hkv, N, G, L).transpose(0, 1)

    # merge by log-sum-exp (written out: the TorchScript exporter has no aten::logaddexp);
    # each token's own key always takes part, so lse_own and the max are finite
    top = torch.maximum(lse_pre, lse_own)
    w_pre, w_own = torch.exp(lse_pre - top)[..., None], torch.exp(lse_own - top)[..., None]
    out = (o_pre * w_pre + o_own * w_own) / (w_pre + w_own)
    return out.reshape(N, H, L, D).transpose(1, 2).to(out_dtype)


@dataclass
class _ExportPass:
    """The attention hook's state in a graph's forward: the prefix graph records each layer's K/V;
    the items graph reads them from its inputs."""

    prefix_k: torch.Tensor | None = None  # (layers, P, Hkv, D)
    prefix_v: torch.Tensor | None = None
    recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def attend(self, layer, query, key, value, scale, sliding_window):
        if self.prefix_k is None:  # prefix pass: plain causal attention, keep K/V as (P, Hkv, D)
            self.recorded[layer] = (key[0].transpose(0, 1), value[0].transpose(0, 1))
            return padded_shared_prefix_attention(query, key, value, None, None, scale, sliding_window)
        return padded_shared_prefix_attention(
            query, key, value, self.prefix_k[layer], self.prefix_v[layer], scale, sliding_window
        )


class PrefixGraph(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.decoder = use_attention_hook(getattr(model, model.base_model_prefix))

    def forward(self, prefix_ids: torch.Tensor):
        P = prefix_ids.shape[1]
        positions = torch.arange(P, device=prefix_ids.device)[None]
        with active(_ExportPass()) as state:
            self.decoder(input_ids=prefix_ids, position_ids=positions, use_cache=False)
        layers = [state.recorded[i] for i in range(len(state.recorded))]
        return torch.stack([k for k, _ in layers]), torch.stack([v for _, v in layers])


class ItemsGraph(torch.nn.Module):
    def __init__(self, model, grade_values: list[float]):
        super().__init__()
        self.decoder = use_attention_hook(getattr(model, model.base_model_prefix))
        self.score = model.score
        self.register_buffer("grade_values", torch.tensor(grade_values, dtype=torch.float32))

    def forward(self, item_ids, item_lengths, prefix_k, prefix_v):
        N, L = item_ids.shape
        positions = (prefix_k.shape[1] + torch.arange(L, device=item_ids.device))[None].expand(N, L)
        with active(_ExportPass(prefix_k, prefix_v)):
            hidden = self.decoder(input_ids=item_ids, position_ids=positions, use_cache=False).last_hidden_state
        last = (item_lengths - 1)[:, None, None].expand(N, 1, hidden.shape[-1])
        probs = self.score(hidden.gather(1, last)[:, 0]).float().softmax(-1)
        return probs, probs @ self.grade_values


# Tracing inputs: at least 2 prefix tokens, 2 items and 2 item tokens, so no axis is traced as 1.
_CHECK_QUERY = "example search query about garden tools"
_CHECK_ITEMS = ["a", "cordless hedge trimmer", "stainless steel garden trowel with a wooden handle", "shovel"]


def _padded(suffixes: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in suffixes)
    ids = torch.tensor([s + [pad_id] * (L - len(s)) for s in suffixes])
    return ids, torch.tensor([len(s) for s in suffixes])


def _export_graphs(model, spec: CheckpointSpec, enc, pad_id: int, out: Path, opset: int) -> None:
    prefix_graph, items_graph = PrefixGraph(model).eval(), ItemsGraph(model, spec.grade_values).eval()
    prefix_ids = torch.tensor([enc.prefix])
    item_ids, item_lengths = _padded(enc.suffixes, pad_id)
    with torch.no_grad():
        prefix_k, prefix_v = prefix_graph(prefix_ids)
    kv_axes = {1: "prefix_len"}
    # The TorchScript exporter (dynamo=False): the padded graphs have no data-dependent shapes,
    # so tracing is exact, and it exports a tiny model in ~2 s where dynamo takes ~35 s.
    # Its one TracerWarning is `_partial_attention`'s empty-keys branch, traced as not taken:
    # right, since every graph call has at least one prefix token and one item token.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        torch.onnx.export(
            prefix_graph, (prefix_ids,), str(out / PREFIX_GRAPH), dynamo=False, opset_version=opset,
            input_names=GRAPH_IO[PREFIX_GRAPH]["inputs"], output_names=GRAPH_IO[PREFIX_GRAPH]["outputs"],
            dynamic_axes={"prefix_ids": {1: "prefix_len"}, "prefix_k": kv_axes, "prefix_v": kv_axes},
        )
        torch.onnx.export(
            items_graph, (item_ids, item_lengths, prefix_k, prefix_v), str(out / ITEMS_GRAPH), dynamo=False,
            opset_version=opset, input_names=GRAPH_IO[ITEMS_GRAPH]["inputs"], output_names=GRAPH_IO[ITEMS_GRAPH]["outputs"],
            dynamic_axes={
                "item_ids": {0: "items", 1: "item_len"}, "item_lengths": {0: "items"},
                "prefix_k": kv_axes, "prefix_v": kv_axes, "probs": {0: "items"}, "scores": {0: "items"},
            },
        )


def optimize_graph(path: Path, num_heads: int, hidden_size: int) -> list[str]:
    """Offline fusions of ONNX Runtime's transformer optimizer, in place; returns the fused op types.

    It has no Llama/Gemma model type; the BERT fusions find Gemma3's tanh-GELU (FastGelu) and all
    its RMSNorms (SimplifiedLayerNormalization), which ONNX Runtime's own session-time fusions
    partly miss. On Llama/Qwen2 graphs it fuses nothing: the session-time fusions already catch
    their RMSNorm. Its attention fusions do not match the shared-prefix attention.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0)
    optimized.save_model_to_file(str(path))
    return sorted(op for op, n in optimized.get_fused_operator_statistics().items() if n)


def quantize_graph(path: Path) -> None:
    """Dynamic int8 of the decoder's MatMul weights (activations quantized per batch), in place.

    Choices (effect measured in README "ONNX Runtime"):
    - MatMul only: the embedding Gather stays fp32. Gemma's 262k x 640 table is most of the
      weights but costs no FLOPs; int8 there saves disk, not time, and its outliers cost accuracy.
    - per-channel weight scales: one scale per output column, not one per matrix.
    - reduce_range (7-bit weights): x86 CPUs without VNNI can saturate the 16-bit sums of u8 x s8
      products; ONNX Runtime's guide (onnxruntime.quantization.quantize docstring, "Choosing
      parameters for CPU inference") recommends it there. Kept on everywhere: 7 bits cost little.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(path), load_external_data=False).graph
    matrices = {w.name for w in graph.initializer if len(w.dims) == 2}
    # weight matrices only: not the (N, K) @ (K,) expected-score product at the end
    weight_matmuls = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in matrices]
    fp32 = path.with_name(path.stem + ".fp32.onnx")
    path.rename(fp32)
    # ONNX shape inference cannot type the outputs of the optimizer's com.microsoft ops; every
    # tensor the quantizer asks about (MatMul outputs) is float
    options = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     nodes_to_quantize=weight_matmuls, per_channel=True, reduce_range=True, extra_options=options)
    fp32.unlink()


def _versions() -> dict:
    import importlib.metadata

    import onnx
    import onnxruntime
    import transformers

    return {
        "darl_infer": importlib.metadata.version("darl-infer"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def export(
    checkpoint: str | Path | None, out_dir: str | Path, *, optimize: bool = True, int8: bool = False, opset: int = OPSET
) -> dict:
    """Export `checkpoint` (None or "default": the embedded default model) to `out_dir`.

    Writes into a temporary directory beside OUT_DIR, renamed when complete. Before that, loads the export the
    way users do and checks it against the reference backend on a sample query: an fp32 export
    that disagrees by more than 1e-4 in probability is refused. Returns darl.json's "onnx" section.
    """
    source = resolve_checkpoint(checkpoint)
    raw = read_spec(source)
    if is_onnx_export(raw):
        raise CheckpointError(f"{source / SPEC_FILE}: already an ONNX export")
    if raw.get("bi_encoder") is not None:  # its graphs would be text -> vector, not prefix/items -> grades
        raise CheckpointError(f"{source}: a bi-encoder checkpoint; the ONNX exporter handles cross-encoder checkpoints only")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):  # before the slow part; atomic_dir checks again at the end
        raise FileExistsError(f"{out}: exists and is not empty; remove it or choose another directory")
    spec = CheckpointSpec.from_dict(raw, source / SPEC_FILE)
    model, tokenizer = load_checkpoint_model(source, spec, torch.float32, torch.device("cpu"))
    enc = spec.template.encoder(tokenizer).encode(_CHECK_QUERY, _CHECK_ITEMS)
    expected = ReferenceBackend(model).probs(enc)  # before the attention is swapped for the export's

    with atomic_dir(out) as partial:  # an interrupted export never looks complete
        _export_graphs(model, spec, enc, model.config.pad_token_id, partial, opset)
        fused = {}
        if optimize:
            for graph in (PREFIX_GRAPH, ITEMS_GRAPH):
                fused[graph] = optimize_graph(partial / graph, model.config.num_attention_heads, model.config.hidden_size)
        if int8:
            for graph in (PREFIX_GRAPH, ITEMS_GRAPH):
                quantize_graph(partial / graph)
        tokenizer.save_pretrained(partial)

        exported = CheckpointSpec(
            labels=spec.labels, grade_values=spec.grade_values, template=spec.template, base_model=None,
            training=spec.training, evaluation=spec.evaluation,
        ).to_dict()
        exported[ONNX_SECTION] = onnx_section = {
            "format_version": ONNX_FORMAT_VERSION,
            "opset": opset,
            "versions": _versions(),
            "source": {"checkpoint": str(source), "base_model": spec.base_model, "architecture": model.config.model_type},
            "graphs": GRAPH_IO,
            "optimized": fused if optimize else None,
            "int8": int8,
            "files": {p.name: sha256(p) for p in sorted(partial.iterdir()) if p.is_file()},
        }
        spec_path = partial / SPEC_FILE
        spec_path.write_text(json.dumps(exported, indent=2, ensure_ascii=False) + "\n")

        got = OnnxBackend(OnnxExport.load(partial)).probs(enc)  # through the loading path users take
        onnx_section["check_max_abs_prob_diff"] = max_diff = float((got - expected).abs().max())
        if not int8 and not max_diff <= 1e-4:
            raise RuntimeError(f"exported graphs disagree with the reference backend: max |Δprob| {max_diff:.3g} > 1e-4")
        spec_path.write_text(json.dumps(exported, indent=2, ensure_ascii=False) + "\n")
    return onnx_section
