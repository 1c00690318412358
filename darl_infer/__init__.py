"""darl_infer: train and serve LLM search-relevance models (DaRL), with exact prefix reuse."""

from .bi_encoder import BiEncoderScorer
from .cascade import CascadeScorer
from .checkpoint import CheckpointError, CheckpointSpec
from .scorer import Scorer, ScoreResult
from .template import Template

__version__ = "0.1.0"
__all__ = ["Scorer", "ScoreResult", "CascadeScorer", "BiEncoderScorer", "CheckpointSpec", "CheckpointError", "Template", "__version__"]
