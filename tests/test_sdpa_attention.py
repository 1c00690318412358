"""The torch backend's fused attention op (PyTorch SDPA) against the shared-prefix reference:
prefix lengths (none included), item counts and lengths, GQA/MQA layouts, sliding windows, dtypes."""

import pytest
import torch

from darl_infer.backends.sdpa_attention import shared_prefix_attention_sdpa
from test_kernels import HEAD_LAYOUTS, ITEM_LENGTHS, ODD_HEAD_DIM, assert_attention_matches


def assert_sdpa_matches(prefix_len, lengths, layout, dtype, sliding_window=None):
    assert_attention_matches(prefix_len, lengths, layout, dtype, sliding_window, op=shared_prefix_attention_sdpa)


@pytest.mark.parametrize("layout", [*HEAD_LAYOUTS, *ODD_HEAD_DIM])
@pytest.mark.parametrize("prefix_len", [0, 1, 37, 512])
@pytest.mark.parametrize("n_items", [1, 3, 130])
def test_sdpa_equals_reference_fp32(prefix_len, n_items, layout):
    assert_sdpa_matches(prefix_len, ITEM_LENGTHS[n_items], layout, torch.float32)


@pytest.mark.parametrize("window", [1, 4, 40, 600])
@pytest.mark.parametrize("prefix_len", [0, 37, 512])
def test_sdpa_sliding_window(prefix_len, window):
    assert_sdpa_matches(prefix_len, ITEM_LENGTHS[3], "gemma3", torch.float32, sliding_window=window)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sdpa_low_precision(dtype):
    assert_sdpa_matches(37, ITEM_LENGTHS[130], "gemma3", dtype)
