"""Offline scoring on Ray Data (the `distributed` extra): the same scores as the local CLI, each
query's prefix run once per batch, actors restarted on failure.

    ds = ray.data.read_parquet("s3://bucket/pairs/")
    darl_infer.distributed.score_dataset(ds, "my-checkpoint", actors=4).write_parquet("s3://bucket/scored/")
"""

from .read import read_pairs
from .score import ScoreBatches, score_dataset
from .write import ScoredPairsSink

__all__ = ["score_dataset", "read_pairs", "ScoreBatches", "ScoredPairsSink"]
