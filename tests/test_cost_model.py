"""The attention cost model: fits, decisions, the dispatcher's dense-or-sparse choice, the disk cache."""

from __future__ import annotations

import json
import os

import pytest
import torch

from adaspark.core import calibration
from adaspark.ops import AttentionStats, cube_sparse_attention
from adaspark.ops.attention import cube_sparse_attention_reference
from adaspark.ops.attention.cost import CostFit, CostModel, measure_costs
from adaspark.ops.attention.native import native_available

from test_attention import CASES, make_case

#: dense costs 1 s per (pair · head · dim): the kernel is free, the selection costs nothing
CHEAP_SPARSE = CostFit(dense=1.0, select_fixed=0.0, select=0.0, kernel_fixed=0.0, kernel=1e-9)
#: a selection that costs more than any dense call
DEAR_SELECT = CostFit(dense=1e-12, select_fixed=10.0, select=0.0, kernel_fixed=0.0, kernel=1e-12)
#: a free selection, but a kernel slower per entry than dense per pair: even the estimate does not pay
SLOW_KERNEL = CostFit(dense=1e-9, select_fixed=0.0, select=0.0, kernel_fixed=0.0, kernel=1.0)


def _between_fit(q, k, v, ids, km) -> CostFit:
    """A kernel fast enough for the pre-selection estimate, too slow for the real plan."""
    from adaspark.ops.attention import plan_blocks, prepare_inputs
    from adaspark.ops.attention.common import causal_valid_pairs
    from adaspark.ops.attention.cost import estimate_executed

    inp = prepare_inputs(q, k, v, ids, 0.5, key_mask=km, granularity="cube")
    est = estimate_executed(q, inp)
    executed = plan_blocks(q, inp, block=64).executed
    assert est < executed  # the estimate keeps no more than the selection
    pairs = float(causal_valid_pairs(inp.key_mask, inp.nq).sum())
    dense = 1e-9
    kernel = 0.9 * dense * pairs * inp.hq / (est * executed) ** 0.5
    return CostFit(dense=dense, select_fixed=0.0, select=0.0, kernel_fixed=0.0, kernel=kernel)


def _model(fit: CostFit) -> tuple[CostModel, list]:
    measured = []

    def measure(**kw):
        measured.append(kw)
        return fit

    return CostModel(measure=measure), measured


@pytest.mark.parametrize(
    ("fit", "decision"),
    [
        (CHEAP_SPARSE, "sparse"),
        (DEAR_SELECT, "dense-before"),
        (SLOW_KERNEL, "dense-before"),
        ("between", "dense-after"),
    ],
)
def test_the_dispatcher_follows_the_cost_model(fit, decision):
    q, k, v, ids, km = make_case(CASES[4])
    if fit == "between":
        fit = _between_fit(q, k, v, ids, km)
    model, measured = _model(fit)
    st = AttentionStats(q.shape[1], q.shape[3])
    out = cube_sparse_attention(
        q, k, v, ids, 0.5, key_mask=km, backend="gather", granularity="cube", stats=st, cost_model=model
    )
    assert model.decisions[decision] == 1 and sum(model.decisions.values()) == 1
    assert len(measured) == 1 and measured[0]["kernel"] == "gather" and measured[0]["granularity"] == "cube"
    exact = cube_sparse_attention_reference(q, k, v, ids, 0.5, key_mask=km, granularity="cube")
    dense = cube_sparse_attention_reference(q, k, v, ids, 1.0, key_mask=km)
    if decision == "sparse":
        torch.testing.assert_close(out, exact, atol=2e-6, rtol=1e-5)
        assert st.dense_fallbacks == 0 and st.sparse_calls == 1 and st.density < 1
    else:
        torch.testing.assert_close(out, dense, atol=2e-6, rtol=1e-5)
        assert st.dense_fallbacks == 1 and st.sparse_calls == 0 and st.density == 1.0
        # decided before selecting: no selection was paid for; after: it was (and is recorded)
        assert (st.selections.sum() > 0) == (decision == "dense-after")


def test_decisions_depend_on_the_call_alone():
    """No history: the same call decides the same way whatever ran before (reproducible runs)."""
    q, k, v, ids, km = make_case(CASES[4])
    model, _ = _model(_between_fit(q, k, v, ids, km))
    first = cube_sparse_attention(q, k, v, ids, 0.5, key_mask=km, backend="gather", cost_model=model)
    after = dict(model.decisions)
    for p in (0.05, 1.0, 0.5):
        again = cube_sparse_attention(q, k, v, ids, p, key_mask=km, backend="gather", cost_model=model)
    assert torch.equal(first, again)
    assert model.decisions[max(after, key=after.get)] >= 2


def test_decode_and_non_block_backends_ignore_the_cost_model():
    q, k, v, ids, km = make_case(CASES[5], seed=7)
    model, measured = _model(DEAR_SELECT)
    ref = cube_sparse_attention_reference(q[:, :, -1:], k, v, ids, 0.5, key_mask=km)
    out = cube_sparse_attention(q[:, :, -1:], k, v, ids, 0.5, key_mask=km, cost_model=model)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    assert measured == [] and sum(model.decisions.values()) == 0


@pytest.mark.real_costs
def test_fits_are_cached_on_disk_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("ADASPARK_CACHE", str(tmp_path))
    measured = []
    monkeypatch.setattr(calibration, "measure_costs", lambda **kw: measured.append(kw) or CHEAP_SPARSE)
    model = calibration.cost_model()
    key = CostModel.key(
        hq=4, hkv=2, d=16, dtype=torch.float32, device="cpu", granularity="cube", kernel="gather"
    )
    assert model.fit(key) == CHEAP_SPARSE and len(measured) == 1
    data = json.loads(calibration.costs_path().read_text())
    (entry,) = data
    assert entry.startswith(f"v{calibration.COSTS_VERSION}|" + calibration.machine_fingerprint("cpu"))
    assert torch.backends.cpu.get_cpu_capability() in entry
    # a new process (a new model) reads the fit instead of measuring again
    again = calibration.cost_model()
    assert again.fit(key) == CHEAP_SPARSE and len(measured) == 1
    # memory only: nothing read or written
    monkeypatch.setenv("ADASPARK_COSTS", "0")
    fresh = calibration.cost_model()
    fresh.measure = lambda **kw: measured.append(kw) or SLOW_KERNEL
    assert fresh.fit(key) == SLOW_KERNEL and len(measured) == 2
    assert json.loads(calibration.costs_path().read_text()) == data
    # another build of the native kernel (its source changed): the fit is measured again
    monkeypatch.setenv("ADASPARK_COSTS", "1")
    import adaspark.ops.attention.native as native

    assert f"native {native.kernel_version()}|" in entry
    monkeypatch.setattr(native, "kernel_version", lambda: "another-build")
    rebuilt = calibration.cost_model()
    assert rebuilt.fit(key) == CHEAP_SPARSE and len(measured) == 3


def test_processes_starting_together_measure_once(tmp_path):
    """Two processes asking for the same fit at once: one measures (under the lock), both get it."""
    import subprocess
    import sys

    code = (
        "import torch, time\n"
        "from adaspark.core import calibration\n"
        "from adaspark.ops.attention.cost import CostFit, CostModel\n"
        "def slow(**kw):\n"
        "    print('measured', flush=True); time.sleep(1.0)\n"
        "    return CostFit(dense=1.0, select_fixed=0.0, select=0.0, kernel_fixed=0.0, kernel=time.time())\n"
        "calibration.measure_costs = slow\n"
        "key = CostModel.key(hq=2, hkv=1, d=8, dtype=torch.float32, device='cpu', granularity='cube', "
        "kernel='gather')\n"
        "print(calibration.cost_model().fit(key).kernel)\n"
    )
    env = {**os.environ, "ADASPARK_CACHE": str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert sum(o.count("measured") for o in outs) == 1
    assert outs[0][-1] == outs[1][-1]  # the same fit


@pytest.mark.parametrize(
    "kernel",
    ["gather", pytest.param("native", marks=pytest.mark.skipif(not native_available(), reason="no native"))],
)
def test_measured_costs_are_positive_and_predict_dense_time(kernel):
    fit = measure_costs(
        hq=4, hkv=2, d=32, dtype=torch.float32, device="cpu", granularity="cube", kernel=kernel, repeats=1
    )
    for name in ("dense", "select", "kernel"):
        assert getattr(fit, name) >= 0
    assert fit.dense > 0 and fit.kernel > 0
    # the sparse path's fixed costs (Python planning) exceed a tiny dense call by far
    assert fit.select_fixed + fit.kernel_fixed > fit.dense_time(96 * 97 / 2, 4, 32)
    # seconds for a 2k-token dense call: a plausible figure (between 10 µs and 10 s)
    assert 1e-5 < fit.dense_time(2048 * 2049 / 2, 4, 32) < 10


@pytest.mark.real_costs
def test_a_patched_model_runs_tiny_prompts_dense_and_says_so(tmp_path, monkeypatch):
    """On this machine's measured costs, a short video prompt does not pay for the selection: every
    layer runs dense attention, decided before selecting, and the report says so."""
    pytest.importorskip("transformers")
    from adaspark import AdaSparkConfig, patch
    from adaspark.integrations.transformers.tiny import build_inputs, tiny_qwen2_5_vl

    monkeypatch.setenv("ADASPARK_CACHE", str(tmp_path))
    model = tiny_qwen2_5_vl(num_layers=2)
    inputs = build_inputs([[(4, 8, 8)]])
    with torch.inference_mode(), patch(model, AdaSparkConfig(p=0.5, cube=(2, 2, 2), sparse_ffn=False)) as h:
        model(**inputs)
        rep = h.report()
    assert rep.sparse_attention_layers == []
    assert [lr.attn_dense_calls for lr in rep.layers] == [1, 1]
    assert all(lr.attn_density == 1.0 for lr in rep.layers)
    assert rep.saved >= 0.0  # no selection was paid for
    assert "ran dense" in rep.summary()
    assert calibration.costs_path().exists()
