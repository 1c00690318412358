"""DaRL loss: each term against an independent formula; the ordinal term prices distance."""

import math

import pytest
import torch
import torch.nn.functional as F

from darl_infer.training.loss import DaRLLoss, LossConfig, balanced_class_weights, resolve_class_weights, squared_emd


def logits_for(probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def emd2_oracle(p, label):
    """Squared EMD to a one-hot target, written out with explicit CDF sums (Hou et al. 2016)."""
    total = 0.0
    for k in range(len(p)):
        cdf_p = sum(p[: k + 1])
        cdf_t = 1.0 if k >= label else 0.0
        total += (cdf_p - cdf_t) ** 2
    return total


def test_squared_emd_matches_explicit_cdf_formula():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(20, 5, generator=g, dtype=torch.float64).softmax(-1)
    labels = torch.randint(0, 5, (20,), generator=g)
    got = squared_emd(probs, labels)
    want = [emd2_oracle(probs[i].tolist(), int(labels[i])) for i in range(20)]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64))


@pytest.mark.parametrize("label, near, far", [(0, 1, 2), (2, 1, 0)])
def test_ordinal_term_prices_a_far_mistake_above_a_near_one(label, near, far):
    # the same confidence (0.8) in a wrong grade: cross-entropy cannot tell these apart
    def confident_in(k):
        p = [0.1, 0.1, 0.1]
        p[k] = 0.8
        return logits_for([p])

    y = torch.tensor([label])
    ce_only = DaRLLoss(LossConfig(ce=1.0))
    assert math.isclose(ce_only(confident_in(near), y).item(), ce_only(confident_in(far), y).item(), rel_tol=1e-9)

    ordinal = DaRLLoss(LossConfig(ce=1.0, ordinal=1.0))
    assert ordinal(confident_in(far), y).item() > ordinal(confident_in(near), y).item()
    ordinal_only = DaRLLoss(LossConfig(ce=0.0, ordinal=1.0))
    assert ordinal_only(confident_in(far), y).item() > 1.5 * ordinal_only(confident_in(near), y).item()


def test_label_smoothing_matches_the_smoothed_target_formula():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (8,), generator=g)
    eps = 0.2
    log_p = logits.log_softmax(-1)
    target = torch.full_like(log_p, eps / 3)
    target[torch.arange(8), labels] += 1 - eps
    want = -(target * log_p).sum(-1).mean()
    got = DaRLLoss(LossConfig(label_smoothing=eps))(logits, labels)
    assert torch.isclose(got, want.float(), atol=1e-6)


def test_confidence_penalty_subtracts_entropy_and_rewards_less_confident_predictions():
    labels = torch.tensor([0])
    beta = 0.5
    loss = DaRLLoss(LossConfig(confidence_penalty=beta))
    for probs in ([0.98, 0.01, 0.01], [0.7, 0.2, 0.1]):
        p = torch.tensor(probs, dtype=torch.float64)
        want = -math.log(probs[0]) - beta * float(-(p * p.log()).sum())
        assert math.isclose(loss(logits_for([probs]), labels).item(), want, rel_tol=1e-5)
    # with the same true-class probability, the penalty prefers spreading the rest evenly
    spread, peaked = logits_for([[0.6, 0.2, 0.2]]), logits_for([[0.6, 0.399, 0.001]])
    assert loss(spread, labels) < loss(peaked, labels)


def test_balanced_class_weights_and_weighted_mean_match_torch():
    labels = [0] * 10 + [1] * 30 + [2] * 60
    w = balanced_class_weights(labels, 3)
    assert torch.allclose(w, torch.tensor([100 / 30, 100 / 90, 100 / 180]))
    assert resolve_class_weights(LossConfig(class_weights=None), labels, 3) is None
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(100, 3, generator=g)
    y = torch.tensor(labels)
    got = DaRLLoss(LossConfig(class_weights="balanced"), w)(logits, y)
    assert torch.isclose(got, F.cross_entropy(logits, y, weight=w), atol=1e-6)
    # an absent grade gets weight 0 rather than infinity
    assert balanced_class_weights([0, 0, 2], 3)[1] == 0


def test_zero_weight_turns_a_term_off():
    g = torch.Generator().manual_seed(3)
    logits, labels = torch.randn(6, 3, generator=g), torch.randint(0, 3, (6,), generator=g)
    only_ordinal = DaRLLoss(LossConfig(ce=0.0, ordinal=2.0))(logits, labels)
    assert torch.isclose(only_ordinal, 2 * squared_emd(logits.softmax(-1), labels).mean(), atol=1e-6)
    terms = DaRLLoss(LossConfig())(logits, labels)
    assert torch.isclose(terms, F.cross_entropy(logits, labels), atol=1e-6)


@pytest.mark.parametrize("bad", [{"ordinal": -1}, {"label_smoothing": 1.0}, {"class_weights": "inverse"}, {"focal": 1}])
def test_bad_loss_config_is_refused(bad):
    with pytest.raises(ValueError):
        LossConfig.from_dict(bad)
