"""The torch backend's fused attention op (PyTorch SDPA) against the shared-prefix reference:
prefix lengths (none included), item counts and lengths, GQA/MQA layouts, sliding windows, dtypes."""

import pytest
import torch

from darl_infer.backends.sdpa_attention import shared_prefix_attention_sdpa
from test_kernels import HEAD_LAYOUTS, ITEM_LENGTHS, ODD_HEAD_DIM, assert_attention_matches, attention_inputs


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


@pytest.mark.parametrize("layout", ["smollm2", "gemma3"])
def test_sdpa_takes_strided_views_bit_for_bit(layout):
    """q, k, v as the model may hand them over: slices of one fused q/k/v projection's rows (a GPU's
    fused modules) or transposed from HF's (heads, T, D) layout; the op gives exactly what it gives
    their contiguous copies."""
    q, k, v, prefix_k, prefix_v, cu, scale = attention_inputs(37, ITEM_LENGTHS[130], layout, torch.float32)
    T, H, D = q.shape
    fused = torch.cat([q, k, v], dim=1)  # (T, H + 2 Hkv, D): q, k, v are views with longer rows
    views = (fused[:, :H], fused[:, H : H + k.shape[1]], fused[:, H + k.shape[1] :])
    transposed = tuple(x.transpose(0, 1).contiguous().transpose(0, 1) for x in (q, k, v))
    expected = shared_prefix_attention_sdpa(q, k, v, prefix_k, prefix_v, cu, scale)
    for strided in (views, transposed):
        assert not strided[0].is_contiguous()
        assert torch.equal(shared_prefix_attention_sdpa(*strided, prefix_k, prefix_v, cu, scale), expected)
