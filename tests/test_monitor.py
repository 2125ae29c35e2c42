"""The expert monitor: per-layer load, spread, dead experts, and the collapse alarm."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from mlxmoe.errors import MlxMoeError
from mlxmoe.losses import expert_counts, router_entropy
from mlxmoe.monitor import CollapseRule, ExpertMonitor

E = 8


def monitor(top_k: int = 2, **rule) -> ExpertMonitor:
    return ExpertMonitor(moe_layers=[1, 3], num_experts=E, top_k=top_k, rule=CollapseRule(**rule))


def balanced(top_k: int = 2, tokens: int = 40) -> np.ndarray:
    return np.full((2, E), top_k * tokens / E)


def collapsed_layer_3(top_k: int = 2, tokens: int = 40) -> np.ndarray:
    counts = balanced(top_k, tokens)
    counts[1] = 0
    counts[1, :top_k] = tokens  # every token on the same top_k experts
    return counts


def test_balanced_counts_have_zero_spread_and_share_k_over_e():
    m = monitor()
    m.update(balanced())
    report = m.report()
    for layer in report["layers"]:
        assert layer["spread"] == pytest.approx(0.0, abs=1e-12)
        assert layer["max_share"] == pytest.approx(2 / E)
        assert layer["load"] == pytest.approx([1 / E] * E)
        assert layer["dead_experts"] == []
    assert [layer["layer"] for layer in report["layers"]] == [1, 3]
    assert report["spread"] == pytest.approx(0.0, abs=1e-12) and report["alarm"] is None


def test_one_hot_counts_have_spread_sqrt_e_minus_1_and_the_rest_dead():
    # load x E is E on one expert and 0 on E-1: mean 1, variance ((E-1)^2 + (E-1)) / E = E-1
    m = monitor(top_k=1)
    m.update(collapsed_layer_3(top_k=1))
    layer = m.report()["layers"][1]
    assert layer["spread"] == pytest.approx(math.sqrt(E - 1))
    assert layer["max_share"] == pytest.approx(1.0)
    assert layer["busiest_expert"] == 0
    assert layer["dead_experts"] == list(range(1, E))


def test_top_k_collapse_has_spread_sqrt_e_over_k_minus_1():
    m = monitor(top_k=2)
    m.update(collapsed_layer_3(top_k=2))
    report = m.report()
    assert report["layers"][1]["spread"] == pytest.approx(math.sqrt(E / 2 - 1))
    assert report["layers"][1]["max_share"] == pytest.approx(1.0)
    assert report["spread"] == pytest.approx(math.sqrt(E / 2 - 1) / 2)
    assert report["max_share"] == pytest.approx(1.0)


def test_dead_experts_are_listed_per_window_and_lora_counts_accumulate():
    m = monitor()
    counts = balanced()
    counts[0, [2, 5]] = 0
    counts[0, [0, 1]] += 10  # keep the row a valid top-2 total
    m.update(counts)
    first = m.report()
    assert first["layers"][0]["dead_experts"] == [2, 5]
    assert first["layers"][0]["never_updated"] == [2, 5]
    m.update(balanced())
    second = m.report()
    assert second["layers"][0]["dead_experts"] == []  # the window was reset
    assert second["layers"][0]["never_updated"] == []
    expected = (counts[0] + balanced()[0]).astype(int).tolist()
    assert second["layers"][0]["lora_update_counts"] == expected


def test_alarm_fires_only_after_patience_consecutive_bad_reports():
    m = monitor(patience=3)
    alarms = []
    bad, good = collapsed_layer_3(), balanced()
    for counts in [bad, bad, good, bad, bad, bad]:
        m.update(counts)
        alarms.append(m.report()["alarm"])
    assert alarms[:5] == [None] * 5  # the balanced report reset the streak
    assert alarms[5] is not None
    # the default share threshold is halfway between balanced (2/8) and 1
    for named in ["layer 3", "expert 0", "max_expert_share 0.625", "max_spread 1.5"]:
        assert named in alarms[5]
    m.update(balanced())
    assert m.report()["alarm"] is None


def test_default_share_threshold_lets_a_balanced_top_2_of_4_router_pass():
    # balanced top-2 of 4 gives every expert half the tokens: a fixed 0.5 threshold would fire
    m = ExpertMonitor(moe_layers=[0], num_experts=4, top_k=2, rule=CollapseRule(patience=1))
    m.update(np.array([[21.0, 19.0, 20.0, 20.0]]))
    assert m.report()["alarm"] is None
    m.update(np.array([[40.0, 31.0, 5.0, 4.0]]))
    assert "max_expert_share 0.75" in m.report()["alarm"]


def test_spread_alone_can_fire_the_alarm():
    m = monitor(patience=1, max_expert_share=1.0, max_spread=0.5)
    counts = balanced()
    counts[0] = [30, 30, 10, 10, 0, 0, 0, 0]  # 40 tokens, top-2; share 0.75, spread sqrt(1.5)
    m.update(counts)
    alarm = m.report()["alarm"]
    assert "layer 1" in alarm and "spread 1.22 (max_spread 0.5)" in alarm
    assert "max_expert_share" not in alarm


def test_should_stop_only_when_the_action_is_stop():
    warn, stop = monitor(patience=2), monitor(patience=2, action="stop")
    for m in (warn, stop):
        for _ in range(2):
            assert not m.should_stop
            m.update(collapsed_layer_3())
            m.report()
    assert not warn.should_stop
    assert stop.should_stop


def test_report_is_json_serialisable_from_real_counts_and_entropy():
    rng = np.random.default_rng(0)
    logits = [mx.array(rng.normal(size=(2, 5, E)).astype(np.float32)) for _ in range(2)]
    mask = mx.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    m = monitor()
    m.update(expert_counts(logits, 2, mask), router_entropy(logits, mask))
    report = json.loads(json.dumps(m.report()))
    assert report["tokens"] == 8
    for layer in report["layers"]:
        assert sum(layer["load"]) == pytest.approx(1.0)
        assert 0.0 < layer["entropy"] < math.log(E)
    json.dumps(m.report())  # an empty window reports too


def test_empty_window_neither_fires_nor_resets_the_alarm():
    m = monitor(patience=2)
    m.update(collapsed_layer_3())
    m.report()
    assert m.report()["alarm"] is None
    m.update(collapsed_layer_3())
    assert m.report()["alarm"] is not None


@pytest.mark.parametrize(
    "rule",
    [dict(action="halt"), dict(patience=0), dict(max_expert_share=1.5), dict(max_spread=0.0)],
)
def test_impossible_collapse_rules_are_user_errors(rule):
    with pytest.raises(MlxMoeError):
        CollapseRule(**rule)


def test_counts_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="n_layers"):
        monitor().update(np.zeros((3, E)))
