"""The loop's per-stage constants against the table in hart-reference.md section 3.5."""

import numpy as np
import pytest

from hartkit.loop.plan import kv_cache_len, phi_index, stage_plan

OFFICIAL = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)
# si, keys after, t (cfg 4.5), top-k, tau, phi  (spec table; final row: stale ratio)
TABLE = [
    (0, 300, 0.0, 600, 0.2700, 0), (1, 304, 0.346, 600, 0.2503, 0), (2, 313, 0.692, 600, 0.2305, 0),
    (3, 329, 1.038, 600, 0.2108, 1), (4, 354, 1.385, 600, 0.1911, 1), (5, 403, 1.731, 600, 0.1714, 1),
    (6, 484, 2.077, 600, 0.1516, 1), (7, 628, 2.423, 300, 0.1319, 2), (8, 884, 2.769, 300, 0.1122, 2),
    (9, 1325, 3.115, 300, 0.0924, 2), (10, 2054, 3.462, 300, 0.0727, 2), (11, 3350, 3.808, 300, 0.0530, 3),
    (12, 5654, 4.154, 300, 0.0332, 3), (13, 9750, 4.154, 300, 0.0332, None),
]


def test_official_stage_table():
    plan = stage_plan(OFFICIAL, context_tokens=300, vocab_size=4096, cfg=4.5, num_phi=4)
    assert len(plan) == 14
    for stage, (si, keys, t, k, tau, phi) in zip(plan, TABLE):
        assert stage.si == si
        assert stage.keys_after == keys
        assert stage.cfg_scale == pytest.approx(t, abs=5e-4)
        assert stage.top_k == k
        assert stage.gumbel_tau == pytest.approx(tau, abs=1e-4)
        assert stage.phi == phi
    final = plan[-1]
    assert final.is_final and final.ratio == plan[-2].ratio == 12 / 13  # the stale ratio quirk
    assert final.logit_scale == pytest.approx(1 + 12 / 13)
    assert plan[0].num_sampled == 1 and plan[0].num_inputs == 300
    assert final.num_inputs == final.num_sampled == 4096
    assert kv_cache_len(OFFICIAL, 300) == 5654


def test_top_k_is_clamped_to_the_vocabulary():
    plan = stage_plan((1, 2, 3), context_tokens=4, vocab_size=100, cfg=1.0, num_phi=4)
    assert all(s.top_k == 100 for s in plan)


def _upstream_phi(si, sn, k):
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    return int(np.argmin(np.abs(ticks - si / (sn - 1))))


@pytest.mark.parametrize("sn", range(2, 17))
@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 10])
def test_phi_index_matches_upstream_expression_including_ties(sn, k):
    for si in range(sn - 1):
        assert phi_index(si, sn, k) == _upstream_phi(si, sn, k)
