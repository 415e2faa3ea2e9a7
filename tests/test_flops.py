"""The FLOP formula against the reference's table and a hand count on tiny; the bit-limit arithmetic."""

import pytest

from hartkit.bench.flops import ar_stage_costs, bit_limit_bytes, kv_cache_bytes
from hartkit.model.presets import get_preset

OFFICIAL = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


def test_official_stage_costs_match_the_reference_table():
    costs = ar_stage_costs(OFFICIAL, 300, 1536, 16, 4096, 4096)
    gmac = [c.macs / 1e9 for c in costs]
    # hart-reference.md section 7 (both branches, GMAC): stage 0, 8..13
    # The reference ran the head over all 300 context rows at stage 0; we slice the last row first.
    unsliced_head = 2 * 299 * 1536 * 4096 / 1e9
    for si, want in [(0, 285 - unsliced_head), (8, 258), (9, 463), (10, 817), (11, 1618), (12, 3398), (13, 7689)]:
        assert gmac[si] == pytest.approx(want, rel=0.005), si
    assert sum(gmac) == pytest.approx(14849 - unsliced_head, rel=0.001)
    assert sum(gmac[1:8]) == pytest.approx(321, rel=0.02)


def test_tiny_hand_count():
    spec = get_preset("tiny").hart
    C, depth, hidden, V = spec.embed_dim, spec.depth, spec.mlp_hidden, 1024
    costs = ar_stage_costs(spec.patch_nums, spec.context_token, C, depth, hidden, V)
    # stage 1: 4 tokens, keys = 64 context + 4 = 68, two CFG rows
    s1 = costs[1]
    assert (s1.tokens, s1.keys) == (4, 68)
    per_row_layer = 4 * (4 * C * C + 3 * C * hidden) + 2 * 4 * 68 * C
    assert s1.linear_macs + s1.attention_macs == 2 * depth * per_row_layer
    assert s1.head_macs == 2 * 4 * C * V
    assert costs[0].head_macs == 2 * 1 * C * V  # stage 0: the last context row only


def test_bit_limit_and_kv_cache():
    assert bit_limit_bytes(1000, 4) == 500
    assert bit_limit_bytes(729_760_000, 8) == pytest.approx(729.76e6)
    # spec: 5654 cached tokens x 16 layers x (K,V) x 1536 x 2 bytes x 2 branches ~ 1.11 GB at fp16
    assert kv_cache_bytes(OFFICIAL, 300, 1536, 16, bytes_per=2) == pytest.approx(1.11e9, rel=0.01)
