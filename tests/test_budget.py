"""Budget mode: ``AdaSparkConfig(budget=B)`` lands a prefill's executed decoder FLOPs on ``B``."""

from __future__ import annotations

import math

import pytest
import torch

from adaspark import AdaSparkConfig
from adaspark.ops.budget import P_MIN, kept_weight, top_p_for_fraction, top_p_for_fraction_reference
from adaspark.ops.selection import SelectionPolicy, keep_from_probs, masked_softmax


# ---------------------------------------------------------------------------------------- ops
def _case(kind: str, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (2, 3, 9)
    scores = torch.randn(shape, generator=g) * 3
    valid = torch.rand(shape, generator=g) > 0.3
    valid[0, 0] = False  # an empty row
    valid[0, 1] = False
    valid[0, 1, 4] = True  # a row with one candidate
    if kind == "uniform":
        scores = torch.zeros(shape)  # ties everywhere
    elif kind == "peaked":
        scores[..., 0] = 30.0  # rows whose first entry holds almost all the mass
    probs = masked_softmax(scores, valid).to(dtype)
    weights = torch.randint(0, 4, shape, generator=g).double()  # zeros included
    if kind == "broadcast":
        weights = torch.rand(1, 3, 9, generator=g).double()  # broadcast over the batch dim
    return probs, valid, weights


FRACTIONS = [0.0, 1e-3, 0.1, 0.37, 0.5, 0.8, 0.999, 1.0]


@pytest.mark.parametrize("kind", ["random", "uniform", "peaked", "broadcast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_p_for_fraction_is_the_smallest_sufficient_threshold(kind, dtype):
    for seed in range(3):
        probs, valid, w = _case(kind, dtype, seed)
        total = float((torch.broadcast_to(w, probs.shape) * valid).sum())
        for f in FRACTIONS:
            p = top_p_for_fraction(probs, valid, w, f)
            assert 0.0 < p <= 1.0
            assert kept_weight(probs, valid, w, p) >= f * total * (1 - 1e-12)
            if p > P_MIN:  # minimal: a slightly smaller threshold keeps too little
                smaller = p * (1 - 1e-6) if p < 1.0 else p - 1e-6
                assert kept_weight(probs, valid, w, smaller) < f * total
            ref = top_p_for_fraction_reference(probs, valid, w, f)
            assert kept_weight(probs, valid, w, ref) == kept_weight(probs, valid, w, p)
            assert abs(ref - p) <= 1e-6


def test_top_p_for_fraction_edges():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    keep = lambda p: keep_from_probs(probs, valid, SelectionPolicy(p=p)).tolist()  # noqa: E731
    assert keep(top_p_for_fraction(probs, valid, 1.0, 2 / 3)) == [[True, True, False]]
    assert keep(top_p_for_fraction(probs, valid, 1.0, 1.0)) == [[True, True, True]]
    assert top_p_for_fraction(probs, valid, 1.0, 0.0) == P_MIN  # rank 0 alone suffices
    # weight only on the last entry: everything must be kept, at the smallest such p (< 1)
    p = top_p_for_fraction(probs, valid, torch.tensor([0.0, 0.0, 1.0]), 0.5)
    assert keep(p) == [[True, True, True]] and p < 0.81
    # no candidate at all
    empty = torch.zeros(2, 4)
    assert top_p_for_fraction(empty, empty > 0, 1.0, 0.7) == P_MIN
    # a single candidate per row
    one = torch.zeros(3, 5)
    one[:, 2] = 1.0
    assert top_p_for_fraction(one, one > 0, 1.0, 1.0) == P_MIN


def test_top_p_for_fraction_bad_input_is_named():
    probs = torch.tensor([[0.5, 0.5]])
    valid = probs > 0
    with pytest.raises(ValueError, match="fraction"):
        top_p_for_fraction(probs, valid, 1.0, 1.5)
    with pytest.raises(ValueError, match="weights"):
        top_p_for_fraction(probs, valid, torch.ones(3), 0.5)
    with pytest.raises(ValueError, match="weights"):
        top_p_for_fraction(probs, valid, -1.0, 0.5)
    with pytest.raises(ValueError, match="probs"):
        top_p_for_fraction(probs.half(), valid, 1.0, 0.5)


def test_search_threshold_brackets_a_step_function():
    from adaspark.core.budget import search_threshold

    calls = []

    def executed(p):  # a monotone step function, like a block plan's count
        calls.append(p)
        return float(int(p * 10))  # 0, 1, ..., 9 on [0, 1)

    p = search_threshold(executed, 4.2, 0.5, steps=10)
    assert executed(p) in (4.0, 5.0) and p in calls[:-1]
    assert search_threshold(executed, 0.0, 0.5) == P_MIN  # the smallest threshold already suffices
    assert executed(search_threshold(executed, 100.0, 0.5)) == 9.0  # out of reach: the largest probe
    assert search_threshold(executed, 9.8, 0.5, at_one=10.0) == 1.0  # dense is closer than any probe
    assert executed(search_threshold(executed, 9.2, 0.5, at_one=10.0)) == 9.0  # the probe is closer
    assert executed(search_threshold(executed, 4.9, 0.5, steps=12)) == 5.0  # the closer side
    assert executed(search_threshold(executed, 4.1, 0.9, steps=12)) == 4.0


# ---------------------------------------------------------------------------------------- config
def test_budget_config_validation():
    assert AdaSparkConfig(budget=0.4).budget == 0.4
    assert AdaSparkConfig(budget=1).budget == 1
    for bad in (0, 0.0, -0.1, 1.5, math.nan, True, "0.5"):
        with pytest.raises(ValueError, match=r"AdaSparkConfig\.budget"):
            AdaSparkConfig(budget=bad)
    with pytest.raises(ValueError, match=r"budget needs policy='top_p'"):
        AdaSparkConfig(budget=0.5, policy="ratio")
    with pytest.raises(ValueError, match=r"AdaSparkConfig\.p_attn=0\.5 cannot be combined"):
        AdaSparkConfig(budget=0.5, p_attn=0.5)
    with pytest.raises(ValueError, match=r"AdaSparkConfig\.p_ffn=0\.5 cannot be combined"):
        AdaSparkConfig(budget=0.5, p_ffn=0.5)
    with pytest.raises(ValueError, match=r"AdaSparkConfig\.dense_fallback=0\.5 cannot be combined"):
        AdaSparkConfig(budget=0.5, cost_model=False, dense_fallback=0.5)


# ---------------------------------------------------------------------------------------- model
pytest.importorskip("transformers")

from adaspark import patch  # noqa: E402
from adaspark.integrations.transformers.tiny import build_inputs, tiny_qwen2_5_vl  # noqa: E402

#: two lengths: ~530 and ~1550 tokens (grids in patches; 2×2 merge)
GRIDS = {"short": (8, 16, 16), "long": (16, 16, 24)}


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2_5_vl(num_layers=3)


@pytest.fixture(scope="module", params=sorted(GRIDS))
def inputs(request):
    return build_inputs([[GRIDS[request.param]]])


@torch.inference_mode()
@pytest.mark.parametrize("budget", [0.5, 0.7, 0.9])
def test_budget_lands_within_three_points(model, inputs, budget):
    with patch(model, AdaSparkConfig(budget=budget)) as h:
        model(**inputs)
        rep = h.report()
    frac = rep.llm_flops_sparse / rep.llm_flops_dense
    assert rep.budget == budget and rep.budget_floor is not None
    assert rep.budget_reachable == (budget >= rep.budget_floor)
    if rep.budget_reachable:
        assert abs(frac - budget) <= 0.03, rep.summary()
        assert f"budget {budget:.2f} of dense decoder FLOPs: executed {frac:.2f}" in rep.summary()
    else:  # the most it can do: the floor
        assert frac == pytest.approx(rep.budget_floor, abs=0.01)
        assert "not reachable: floor" in rep.summary()
    assert all(lr.p_attn is not None and 0 < lr.p_attn <= 1 for lr in rep.layers)
    assert all(lr.p_ffn is not None and 0 < lr.p_ffn <= 1 for lr in rep.layers)
    assert rep.to_dict()["budget_reachable"] == rep.budget_reachable


@torch.inference_mode()
def test_budget_is_reachable_and_hit_on_the_long_input(model):
    inputs = build_inputs([[GRIDS["long"]]])
    fracs = []
    for budget in (0.55, 0.75):
        with patch(model, AdaSparkConfig(budget=budget)) as h:
            model(**inputs)
            rep = h.report()
        assert rep.budget_reachable, rep.summary()
        fracs.append(rep.llm_flops_sparse / rep.llm_flops_dense)
        assert abs(fracs[-1] - budget) <= 0.03
        assert any(lr.p_attn < 1 for lr in rep.layers) and any(lr.ffn_active < 1 for lr in rep.layers)
    assert fracs[0] < fracs[1]  # a smaller budget executes less: the thresholds really changed


@torch.inference_mode()
def test_budget_below_the_floor_is_reported(model):
    inputs = build_inputs([[GRIDS["short"]]])
    with patch(model, AdaSparkConfig(budget=0.05)) as h:
        model(**inputs)
        rep = h.report()
    assert rep.budget_reachable is False
    assert rep.llm_flops_sparse / rep.llm_flops_dense == pytest.approx(rep.budget_floor, abs=0.01)
    assert "not reachable: floor" in rep.summary()


@torch.inference_mode()
def test_budget_one_equals_dense(model, inputs):
    ref = model(**inputs).logits
    with patch(model, AdaSparkConfig(budget=1.0)) as h:
        out = model(**inputs).logits
        rep = h.report()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert all(lr.p_attn == 1.0 and lr.p_ffn == 1.0 for lr in rep.layers)
    assert all(lr.ffn_active == 1.0 for lr in rep.layers)


@torch.inference_mode()
def test_decode_after_a_budget_prefill_reuses_the_thresholds(model):
    inputs = build_inputs([[GRIDS["long"]]])
    with patch(model, AdaSparkConfig(budget=0.6)) as h:
        model(**inputs)
        chosen = [(lr.p_attn, lr.p_ffn) for lr in h.report().layers]
        assert all(p < 1 for p, _ in chosen)
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        rep = h.report()
        # the decode steps ran with each layer's prefill threshold, not the config's p
        assert [h._state._attn_policy(i).p for i in range(3)] == [p for p, _ in chosen]
        assert h._state._attn_policy(0).p != h.config.p
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3
    assert rep.decode_steps == 2 and rep.sparse_decode_steps == 2
    assert [(lr.p_attn, lr.p_ffn) for lr in rep.layers] == chosen  # the same prefill, the same choice


# ---------------------------------------------------------------------------------------- CLI
def _cli(argv: list[str]) -> tuple[int, str, str]:
    import contextlib
    import io

    from adaspark import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("value", ["1.5", "0", "-0.2"])
def test_ask_bad_budget_is_one_line(value):
    code, out, err = _cli(["ask", "--budget", value, "--no-progress"])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and out == "" and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("adaspark: error: ")
    assert "AdaSparkConfig.budget" in lines[0]


def test_ask_bad_budget_combination_is_one_line():
    code, _out, err = _cli(["ask", "--budget", "0.5", "--policy", "ratio", "--no-progress"])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "AdaSparkConfig.budget needs policy='top_p'" in lines[0]


def test_ask_with_a_budget(tmp_path):
    import json

    out_json = tmp_path / "ask.json"
    argv = ["ask", "--frames", "128", "--seed", "2", "--budget", "0.8", "--json", str(out_json)]
    code, out, err = _cli([*argv, "--repeats", "1", "--no-progress"])
    assert code == 0, err
    assert "AdaSpark  budget 0.80 of the dense decoder FLOPs" in out
    data = json.loads(out_json.read_text())
    rep = data["adaspark"]["report"]
    assert rep["budget"] == 0.8 and rep["budget_floor"] is not None
    assert all(lr["p_attn"] is not None for lr in rep["layers"])
    frac = rep["llm_flops_sparse"] / rep["llm_flops_dense"]
    assert f"Budget 0.80: the decoder executed {frac:.2f} of its dense FLOPs" in out


def test_eval_budgets_add_budget_variants(tmp_path):
    import json

    from adaspark.needle.evaluate import standard_variants, summarize

    names = [v.name for v in standard_variants([0.5], families=["top_p"], flop_budgets=[0.6, 0.8])]
    assert names == ["dense", "top_p@0.5", "budget@0.6", "budget@0.8"]
    out = tmp_path / "ev"
    argv = ["eval", "--lengths", "32", "--n", "1", "--ps", "0.5", "--families", "top_p", "--budgets", "0.7"]
    code, _, err = _cli([*argv, "--tasks", "retrieval", "--out", str(out), "--no-plot", "--no-progress"])
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    assert sorted(r["variant"] for r in rows) == ["budget@0.7", "dense", "top_p@0.5"]
    (row,) = [r for r in rows if r["variant"] == "budget@0.7"]
    assert row["config"]["budget"] == 0.7
    assert "budget" in {s["family"] for s in summarize(out / "results.jsonl")}


@pytest.mark.parametrize("value", ["1.5", "0", "x"])
def test_eval_bad_budgets_are_usage_errors(value, tmp_path):
    code, out, err = _cli(["eval", "--budgets", value, "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2 and out == "" and "usage: adaspark eval" in err
    assert "argument --budgets: expected a number in (0, 1]" in err.splitlines()[-1]


@torch.inference_mode()
@pytest.mark.parametrize(
    ("config", "grids"),
    [
        (AdaSparkConfig(budget=0.7, dense_layers=(0,)), [[GRIDS["long"]]]),
        (AdaSparkConfig(budget=0.75, sparse_ffn=False), [[GRIDS["long"]]]),  # attention alone: floor ~0.71
        (AdaSparkConfig(budget=0.7, backend="gather"), [[GRIDS["long"]]]),
        (AdaSparkConfig(budget=0.7), [[GRIDS["long"]], [GRIDS["short"], (4, 8, 8)]]),  # padded batch
    ],
    ids=["dense-layer", "dense-ffn", "gather", "padded-batch"],
)
def test_budget_with_dense_parts_other_kernels_and_batches(model, config, grids):
    inputs = build_inputs(grids, padding_side="left")
    with patch(model, config) as h:
        model(**inputs)
        rep = h.report()
        assert h._state.cost_model is None  # budget mode never runs the cost model's dense decisions
    assert rep.budget_reachable, rep.summary()
    assert abs(rep.llm_fraction - config.budget) <= 0.03, rep.summary()
    steered = [lr for lr in rep.layers if not lr.dense]
    assert all(lr.p_attn is not None and lr.p_attn < 1 for lr in steered)
    assert all((lr.p_ffn is None) == (not config.sparse_ffn) for lr in steered)
    assert all(lr.p_attn is None and lr.p_ffn is None for lr in rep.layers if lr.dense)


@torch.inference_mode()
@pytest.mark.parametrize(
    "grids", [[[GRIDS["long"]]], [[GRIDS["long"]], [GRIDS["short"], (4, 8, 8)]]], ids=["one", "padded"]
)
def test_budget_search_reusing_its_scores_runs_what_a_fresh_selection_runs(model, grids, monkeypatch):
    """The threshold search computes a layer's cube distributions once and plans the kernel's run
    from them: logits, thresholds and executed FLOPs equal those of selecting anew at every probe."""
    from adaspark.integrations.transformers import patching

    inputs = build_inputs(grids, padding_side="left")

    def run():
        with patch(model, AdaSparkConfig(budget=0.6)) as h:
            logits = model(**inputs).logits
            return logits, h.report()

    fast, rep_fast = run()
    monkeypatch.setattr(patching, "unit_scores", lambda *a, **k: None)  # every probe selects anew
    slow, rep_slow = run()
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)
    assert [(lr.p_attn, lr.p_ffn) for lr in rep_fast.layers] == [
        (lr.p_attn, lr.p_ffn) for lr in rep_slow.layers
    ]
    assert rep_fast.llm_flops_sparse == rep_slow.llm_flops_sparse
    assert any(lr.p_attn is not None and lr.p_attn < 1 for lr in rep_fast.layers)
