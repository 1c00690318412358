"""Bi-encoder checkpoints (darl_infer/bi_encoder.py) against an independent oracle: each text alone
through HF transformers' own forward pass (the merged LoRA trunk, no prefix runner), its last
hidden state scaled to unit RMS, the head applied in the test. Whatever the batch, order, chunking,
cache or thread, every probability must equal the oracle's for that pair alone."""

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoTokenizer

from conftest import ragged_items
from darl_infer import BiEncoderScorer, Scorer
from darl_infer.base_models import base_model_dir, split_layers
from darl_infer.checkpoint import CheckpointError
from tiny_models import make_bi_encoder_checkpoint, make_checkpoint, random_text

TOL = 1e-5


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def bi_encoder(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"bi_{request.param}")
    base = make_checkpoint(root / "base", request.param, seed=3)
    return make_bi_encoder_checkpoint(root / "bi", base, seed=4)


class Oracle:
    """A pair's probabilities from two HF forward passes of one text each."""

    def __init__(self, directory):
        spec = json.loads((directory / "darl.json").read_text())
        self.template = spec["template"]
        base = base_model_dir(spec["base_model"])  # a folder, or a registered name such as "gemma3-270m@2"
        self.tokenizer = AutoTokenizer.from_pretrained(str(base))
        config = AutoConfig.from_pretrained(str(base))
        layers = split_layers(spec["base_model"])[1]
        if layers is not None:  # the bottom layers only, as NAME@L says
            config.num_hidden_layers = layers
            if getattr(config, "layer_types", None) is not None:
                config.layer_types = config.layer_types[:layers]
        trunk = AutoModel.from_pretrained(str(base), config=config, attn_implementation="eager")
        self.trunk = PeftModel.from_pretrained(trunk, str(directory)).merge_and_unload().eval()
        self.head = load_file(str(directory / "head.safetensors"))
        bos = self.tokenizer.bos_token_id  # as the tokenizer itself does: only if it adds one
        self.bos = [bos] if self.tokenizer("w1").input_ids[:1] == [bos] else []

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def vector(self, label: str, text: str, limit: int) -> torch.Tensor:
        ids = self.bos + self.ids(label) + self.ids(text)[:limit] + self.ids(self.template["answer_cue"])
        with torch.no_grad():
            h = self.trunk(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        return h / h.pow(2).mean().sqrt()

    def probs(self, query: str, items: list[str]) -> np.ndarray:
        q = self.vector(self.template["query_label"], query, self.template["max_query_tokens"])
        out = []
        for item in items:
            i = self.vector(self.template["item_label"], item, self.template["max_item_tokens"])
            x = torch.cat([q, i, q * i, (q - i).abs()])
            hidden = torch.nn.functional.gelu(self.head["hidden.weight"] @ x + self.head["hidden.bias"])
            out.append((self.head["score.weight"] @ hidden + self.head["score.bias"]).softmax(-1).numpy())
        return np.stack(out)


@pytest.fixture(scope="module")
def oracle(bi_encoder):
    return Oracle(bi_encoder)


def test_loads_as_a_bi_encoder_scorer(bi_encoder):
    scorer = Scorer.from_pretrained(bi_encoder)
    assert isinstance(scorer, BiEncoderScorer)
    assert scorer.dtype == "fp32" and scorer.labels == ["irrelevant", "weak", "strong"]


def test_each_pair_equals_the_oracle_in_any_batch(bi_encoder, oracle, rng):
    scorer = Scorer.from_pretrained(bi_encoder, token_budget=40)  # several packed chunks per call
    batch = [(random_text(rng, rng.randint(1, 12)), ragged_items(rng, rng.randint(1, 9), 30)) for _ in range(4)]
    batch.append((random_text(rng, 3), []))  # a query without items
    results = scorer.score_many(batch)
    for (query, items), result in zip(batch, results):
        assert len(result) == len(items)
        if items:
            np.testing.assert_allclose(result.probs, oracle.probs(query, items), atol=TOL, rtol=0)
            np.testing.assert_allclose(result.scores, result.probs @ np.array([0.0, 1.0, 2.0]), atol=1e-6)
    # the same query alone, its items reversed: the same probability per item
    query, items = batch[0]
    alone = scorer.score(query, items[::-1])
    np.testing.assert_allclose(alone.probs[::-1], results[0].probs, atol=TOL, rtol=0)


def test_item_cache_and_precomputed_vectors_give_the_same_scores(bi_encoder, oracle, rng):
    scorer = Scorer.from_pretrained(bi_encoder, item_cache_mb=1)
    query, items = random_text(rng, 4), ragged_items(rng, 6, 20)
    first = scorer.score(query, items)
    again = scorer.score(query, items + items[:2])  # every item now from the cache, two twice
    stats = scorer.prefix_cache_stats()
    assert stats["hits"] == 6 and stats["entries"] == 6
    np.testing.assert_array_equal(again.probs[:6], first.probs)
    np.testing.assert_array_equal(again.probs[6:], first.probs[:2])
    vectors = scorer.encode_items(items)
    assert vectors.shape == (6, scorer.vectors.hidden_size) and vectors.dtype == np.float32
    np.testing.assert_allclose(scorer.score_vectors(query, vectors).probs, oracle.probs(query, items), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match=r"item_vectors must be \(N, "):
        scorer.score_vectors(query, vectors[:, :5])


def test_truncation_is_reported_and_matches_the_oracle(bi_encoder, oracle, rng):
    scorer = Scorer.from_pretrained(bi_encoder)
    long_item = random_text(rng, 90)  # over max_item_tokens = 64
    result = scorer.score("w1 w2", ["w3", long_item])
    assert result.truncated.tolist() == [False, True]
    np.testing.assert_allclose(result.probs, oracle.probs("w1 w2", ["w3", long_item]), atol=TOL, rtol=0)


def test_concurrent_calls_equal_sequential_ones(bi_encoder, rng):
    scorer = Scorer.from_pretrained(bi_encoder, item_cache_mb=1)
    work = [(random_text(rng, rng.randint(1, 8)), ragged_items(rng, 5, 20)) for _ in range(12)]
    sequential = [scorer.score(q, items).probs for q, items in work]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(lambda w: scorer.score(*w).probs, work))
    for a, b in zip(sequential, concurrent):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0)


def test_rank_predict_and_cascade_work_with_a_bi_encoder(bi_encoder, rng):
    scorer = Scorer.from_pretrained(bi_encoder)
    items = ragged_items(rng, 5, 10)
    ranked = scorer.rank("w1 w2", items, top_k=3, return_documents=True)
    result = scorer.score("w1 w2", items)
    assert [r["corpus_id"] for r in ranked] == list(np.argsort(-result.scores, kind="stable")[:3])
    np.testing.assert_allclose(scorer.predict([("w1 w2", it) for it in items]), result.scores, atol=1e-6)
    cascade = Scorer.cascade(scorer, scorer, keep=2)
    graded = cascade.score("w1 w2", items)
    assert sorted(graded.graded_by.tolist()).count("fine") == 2
    np.testing.assert_allclose(graded.probs, result.probs, atol=TOL)


def test_bad_bi_encoder_checkpoints_and_options_are_named(bi_encoder, tmp_path):
    with pytest.raises(ValueError, match="bi-encoder.*backend must be 'auto' or 'torch'"):
        Scorer.from_pretrained(bi_encoder, backend="reference")
    with pytest.raises(ValueError, match="item_cache_mb=, not prefix_cache_mb="):
        Scorer.from_pretrained(bi_encoder, prefix_cache_mb=8)
    with pytest.raises(TypeError, match="no option 'threads'"):
        Scorer.from_pretrained(bi_encoder, threads=2)

    broken = tmp_path / "broken"
    shutil.copytree(bi_encoder, broken)
    spec = json.loads((broken / "darl.json").read_text())
    spec["bi_encoder"]["head_hidden"] = 7
    (broken / "darl.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match=r"head\.safetensors: not this checkpoint's head"):
        Scorer.from_pretrained(broken)
    spec["bi_encoder"] = {"head_hidden": 32, "features": "q,i"}
    (broken / "darl.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="field 'bi_encoder' asks for features 'q,i'"):
        Scorer.from_pretrained(broken)
    spec["bi_encoder"] = {"head_hidden": 32}
    (broken / "darl.json").write_text(json.dumps(spec))
    (broken / "head.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"head\.safetensors: missing"):
        Scorer.from_pretrained(broken)


def test_onnx_export_refuses_a_bi_encoder_by_name(bi_encoder, tmp_path):
    onnx_export = pytest.importorskip("darl_infer.backends.onnx_export")
    with pytest.raises(CheckpointError, match="a bi-encoder checkpoint; the ONNX exporter handles cross-encoder"):
        onnx_export.export(bi_encoder, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
