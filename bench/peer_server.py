"""The peer of `darl-infer serve` that a team would write by hand: one FastAPI endpoint that calls
sentence-transformers' `CrossEncoder.predict` on each request's pairs, nothing shared between
requests.

    python bench/peer_server.py --checkpoint DIR [--dtype fp32] --port 8081

Same checkpoint, same inputs as darl_infer:
- CrossEncoder loads a plain AutoModelForSequenceClassification folder, not a PEFT adapter over a
  base, so the checkpoint is first merged into one with the project's own loader
  (bench/workload.py `merged_hf_folder`, cached): the same weights darl_infer scores with.
- Its tokenizer would build its own pair template; the model was trained on darl_infer's, so
  `preprocess` is pointed at darl_infer's template ids (as bench/row.py's crossencoder row does).
  Batching (32 pairs, CrossEncoder's default), padding and the forward pass stay CrossEncoder's.
The endpoint is a plain `def`: FastAPI runs it in its thread pool, as such endpoints are written.
It answers TEI's shape with the expected grade as `score` (darl's `raw_scores=true`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from sentence_transformers import CrossEncoder

from darl_infer.checkpoint import CheckpointSpec
from darl_infer.loading import DTYPES
from darl_infer.checkpoint import resolve_checkpoint

from workload import merged_hf_folder


class RerankRequest(BaseModel):
    query: str
    texts: list[str]


def create_app(checkpoint: Path, dtype: str, device: str) -> FastAPI:
    spec = CheckpointSpec.load(checkpoint)
    ce = CrossEncoder(str(merged_hf_folder(checkpoint)), device=device, model_kwargs={"dtype": DTYPES[dtype]})
    encoder = spec.template.encoder(ce.tokenizer)
    grade_values = np.array(spec.grade_values, dtype=np.float32)

    def preprocess(pairs, **kwargs):
        ids = []
        for query, item in pairs:
            enc = encoder.encode(query, [item])
            ids.append(enc.prefix + enc.suffixes[0])
        return {**ce.tokenizer.pad({"input_ids": ids}, return_tensors="pt"), "modality": "text"}

    ce.preprocess = preprocess
    app = FastAPI()

    @app.post("/rerank")
    def rerank(body: RerankRequest):
        probs = ce.predict([(body.query, t) for t in body.texts], batch_size=32, apply_softmax=True, show_progress_bar=False)
        scores = np.asarray(probs, dtype=np.float32) @ grade_values
        return [{"index": int(i), "score": float(scores[i])} for i in np.argsort(-scores, kind="stable")]

    @app.get("/health")
    def health():
        return {"status": "ok"}

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    args = p.parse_args()
    app = create_app(resolve_checkpoint(args.checkpoint), args.dtype, args.device)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
