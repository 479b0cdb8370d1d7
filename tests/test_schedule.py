import math

import pytest

from megalm.config import OptimConfig
from megalm.optim.schedule import learning_rate


def test_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=10, lr_decay_iters=110, lr_decay_style="cosine")
    assert learning_rate(cfg, 1) == pytest.approx(0.1)
    assert learning_rate(cfg, 10) == pytest.approx(1.0)
    assert learning_rate(cfg, 60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(cfg, 110) == pytest.approx(0.1)
    assert learning_rate(cfg, 500) == pytest.approx(0.1)


def test_linear_and_constant():
    lin = OptimConfig(lr=1.0, min_lr=0.0, lr_warmup_iters=0, lr_decay_iters=100, lr_decay_style="linear")
    assert [learning_rate(lin, i) for i in (0, 25, 100)] == pytest.approx([1.0, 0.75, 0.0])
    const = OptimConfig(lr=0.5, lr_warmup_iters=4, lr_decay_iters=100, lr_decay_style="constant")
    assert [learning_rate(const, i) for i in (2, 4, 50)] == pytest.approx([0.25, 0.5, 0.5])
