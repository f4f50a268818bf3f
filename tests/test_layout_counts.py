"""Parameter counts of the parallel layouts, without allocating: the released 2-way and 4-way codes print
these totals (all ranks, 72 padded outputs, per-rank biases); our faithful layouts store exactly as many."""
import pytest

from jigsaw_ref.config import MixerConfig, preset
from jigsaw_ref.mixer import param_count
from jigsaw_ref.parallel import layout_param_count

REL = dict(out_pad=3, res_inputs="all", dec_bias="pixel")
RELEASED = {  # (H, f_s, f_c): (2-way, 4-way) as printed by the released code (the released scripts' logs, DeifiliaTo/Jigsaw_SC cases/C1-C4)
    (4896, 0.5, 1): (1_103_268_024, 1_103_453_424), (2832, 0.5, 1): (980_771_688, 980_913_744),
    (2192, 0.25, 1): (505_261_128, 505_376_784), (1600, 0.125, 1): (260_151_912, 260_248_656),
    (1024, 0.125, 0.25): (238_885_416, 238_967_760), (512, 0.125, 1): (232_241_448, 232_315_344),
    (368, 0.03125, 1): (61_645_404, 61_711_416), (256, 0.125, 0.125): (227_393_928, 227_461_776),
    (8192, 0.5, 1): (1_404_881_688, None), (6064, 1, 1): (2_091_058_632, 2_091_294_480), (10352, 1, 1): (None, 2_569_397_904)}


@pytest.mark.parametrize("key", list(RELEASED))
def test_faithful_layouts_store_the_released_counts(key):
    H, fs, fc = key
    c = MixerConfig(hidden=H, f_s=fs, f_c=fc, **REL)
    two, four = RELEASED[key]
    if two is not None:
        assert layout_param_count(c, 1, 2, "faithful") == two
    if four is not None:
        assert layout_param_count(c, 2, 2, "faithful") == four


@pytest.mark.parametrize("pq", [(1, 2), (2, 1), (2, 2), (1, 4), (4, 2)])
def test_exact_layouts_replicate_only_vectors(pq):
    "Exact mode stores the one-process parameters once, plus per-domain-partner copies of a few vectors."
    c = preset("small")
    p, q = pq
    extra = layout_param_count(c, p, q) - param_count(c)
    assert 0 <= extra <= (p - 1) * (6 * c.blocks + 10) * max(c.hidden, c.n_out * c.patch)
    assert extra / param_count(c) < 0.01
