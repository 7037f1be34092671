"""ParallelDims arithmetic: derived dp, every error message, rank coordinates, describe()."""

from __future__ import annotations

import pytest

from metaapo_nemo.parallel.dims import ParallelDims


def _error(dims: ParallelDims, **model) -> str:
    with pytest.raises(ValueError) as info:
        dims.validate(**model)
    return str(info.value)


def test_dp_is_derived():
    assert ParallelDims(world_size=16, tp=2, pp=2).dp == 4
    assert ParallelDims(world_size=16, tp=2, pp=2, cp=2).dp == 2
    assert ParallelDims(world_size=1).dp == 1
    assert ParallelDims(world_size=8, tp=2, pp=2, cp=2).model_parallel_size == 8


def test_valid_layouts_pass():
    ParallelDims(world_size=8, tp=2, pp=2).validate(
        num_layers=32, num_attention_heads=32, num_kv_heads=8
    )
    ParallelDims(world_size=8, pp=2, vpp=4).validate(num_layers=32)
    ParallelDims(world_size=1).validate()


def test_frozen():
    dims = ParallelDims(world_size=2)
    with pytest.raises(AttributeError):
        dims.tp = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"world_size": 0}, "world_size=0 must be >= 1"),
        ({"world_size": 4, "tp": 0}, "parallel.tp=0 must be >= 1"),
        ({"world_size": 4, "pp": -1}, "parallel.pp=-1 must be >= 1"),
        ({"world_size": 4, "cp": 0}, "parallel.cp=0 must be >= 1"),
        ({"world_size": 4, "ep": 0}, "ep=0 must be >= 1"),
        ({"world_size": 4, "pp": 2, "vpp": 0}, "parallel.vpp=0 must be >= 1 or null"),
    ],
)
def test_values_below_one(kwargs, text):
    assert text in _error(ParallelDims(**kwargs))


def test_world_not_multiple_of_model_parallel():
    msg = _error(ParallelDims(world_size=6, tp=4))
    assert "world_size=6 is not divisible by parallel.tp=4 x parallel.pp=1 x parallel.cp=1" in msg
    assert "parallel.cp=1 = 4; use" in msg
    assert "use a world size of 4 or 8" in msg
    assert "(tp, pp) in (1, 1), (1, 2), (1, 3), (1, 6), (2, 1), (2, 3)" in msg


def test_world_combos_respect_model_shape():
    msg = _error(ParallelDims(world_size=6, tp=4), num_layers=4, num_attention_heads=4)
    assert "(tp, pp) in (1, 1), (1, 2), (2, 1) with cp=1" in msg


def test_world_with_cp():
    msg = _error(ParallelDims(world_size=4, tp=2, cp=4))
    assert "parallel.tp=2 x parallel.pp=1 x parallel.cp=4 = 8; use a world size of 8" in msg


def test_tp_must_divide_heads():
    msg = _error(ParallelDims(world_size=8, tp=3), num_attention_heads=32)
    assert "parallel.tp=3 does not divide model.num_attention_heads=32" in msg
    assert "(32 / 3 = 10.6667)" in msg
    assert msg.endswith("use 1, 2, 4 or 8") or "use 1, 2, 4 or 8\n" in msg


def test_tp_must_divide_kv_heads():
    msg = _error(ParallelDims(world_size=8, tp=8), num_attention_heads=32, num_kv_heads=4)
    assert "parallel.tp=8 does not divide model.num_key_value_heads=4 (4 / 8 = 0.5)" in msg
    assert "use 1, 2 or 4" in msg
    assert "num_attention_heads" not in msg


def test_pp_must_divide_layers():
    msg = _error(ParallelDims(world_size=8, pp=3), num_layers=28)
    assert "parallel.pp=3 does not divide model.num_layers=28 (28 / 3 = 9.33333 layers" in msg
    assert "use 1, 2 or 4" in msg


def test_vpp_needs_pp():
    msg = _error(ParallelDims(world_size=2, vpp=2))
    assert "parallel.vpp=2 needs parallel.pp > 1 (pp=1)" in msg
    assert "parallel.vpp=null" in msg


def test_vpp_must_divide_layers_per_stage():
    msg = _error(ParallelDims(world_size=4, pp=2, vpp=3), num_layers=8)
    assert "model.num_layers=8 is not divisible by parallel.pp=2 x parallel.vpp=3 = 6" in msg
    assert "use vpp 2 or 4" in msg


def test_ep_must_divide_dp_cp():
    msg = _error(ParallelDims(world_size=4, tp=2, ep=4))
    assert "ep=4 does not divide data-parallel x context-parallel size dp 2 x cp 1 = 2" in msg
    assert "use ep 1 or 2" in msg


def test_all_errors_reported_together():
    msg = _error(ParallelDims(world_size=6, tp=4, pp=3), num_layers=8, num_attention_heads=6)
    assert "parallel.tp=4 does not divide model.num_attention_heads=6" in msg
    assert "parallel.pp=3 does not divide model.num_layers=8" in msg
    assert "world_size=6 is not divisible" in msg
    assert len(msg.splitlines()) == 3


def test_coords_megatron_order():
    dims = ParallelDims(world_size=8, tp=2, pp=2)
    got = [dims.coords(r) for r in range(8)]
    assert got[0] == {"dp": 0, "pp": 0, "cp": 0, "tp": 0}
    assert got[1] == {"dp": 0, "pp": 0, "cp": 0, "tp": 1}  # tp fastest
    assert got[2] == {"dp": 1, "pp": 0, "cp": 0, "tp": 0}
    assert got[4] == {"dp": 0, "pp": 1, "cp": 0, "tp": 0}  # pp slowest
    assert got[7] == {"dp": 1, "pp": 1, "cp": 0, "tp": 1}
    cp = ParallelDims(world_size=8, tp=2, cp=2)
    assert cp.coords(2) == {"dp": 0, "pp": 0, "cp": 1, "tp": 0}  # cp before dp
    assert cp.coords(4) == {"dp": 1, "pp": 0, "cp": 0, "tp": 0}
    with pytest.raises(ValueError, match="rank=8 is outside"):
        dims.coords(8)


def test_describe_small_world():
    text = ParallelDims(world_size=8, tp=2, pp=2).describe()
    assert "world_size=8 = tp 2 x cp 1 x pp 2 x dp 2" in text
    assert "tp=2 pp=2 vpp=null cp=1 ep=1 dp=2" in text
    assert "tp-cp-ep-dp-pp" in text
    assert "rank  0 -> (dp=0, pp=0, tp=0)" in text
    assert "rank  5 -> (dp=0, pp=1, tp=1)" in text
    assert "rank  7 -> (dp=1, pp=1, tp=1)" in text
    assert len([line for line in text.splitlines() if "rank " in line and "->" in line]) == 8


def test_describe_shows_cp_and_vpp():
    text = ParallelDims(world_size=8, pp=2, cp=2, vpp=2).describe()
    assert "vpp=2" in text
    assert "rank  1 -> (dp=0, pp=0, cp=1, tp=0)" in text


def test_describe_large_world_omits_table():
    text = ParallelDims(world_size=64, tp=8, pp=2).describe()
    assert "dp 4" in text
    assert "rank table omitted" in text
    assert "->" not in text


def test_describe_inconsistent_layout():
    assert "inconsistent" in ParallelDims(world_size=6, tp=4).describe()


def test_no_heavy_imports():
    import subprocess
    import sys

    code = (
        "import sys, metaapo_nemo.parallel.dims as d; "
        "print(any(m.startswith('megatron') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
