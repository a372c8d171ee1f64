"""Shared fixtures.

Like flash-linear-attention's suite, freshly allocated float tensors are filled with NaN while the
ops tests run (``nan_empty`` fixture), so a kernel that skips a block and leaves output unwritten
fails loudly instead of passing with whatever memory held.

The fixture poisons the uninitialised allocations (``torch.empty`` / ``empty_like`` /
``empty_strided`` / ``Tensor.new_empty``). ``zeros`` / ``full`` are left alone on purpose: kernels
use them where zeros are the meaning (padding rows, additive masks, counters). The rule for the ops
is therefore that a kernel's *output* is allocated uninitialised and every element written;
``nan_empty`` returns a recorder whose ``poisoned(out)`` tells whether a returned tensor lives in
such an allocation, so a test can assert that the fixture really saw the kernel's output.
"""

from __future__ import annotations

import os

import pytest
import torch

# The commands' default model is SmolVL (a 135M-parameter LM fetched from PyPI); the suite runs them
# on the tiny shipped model unless a test names SmolVL (tests/test_smolvl.py does, end to end).
os.environ["ADASPARK_MODEL"] = "tiny"


class PoisonRecorder:
    """The allocations ``nan_empty`` filled with NaN (kept alive, so no address is reused)."""

    def __init__(self) -> None:
        self._tensors: list[torch.Tensor] = []
        self._ptrs: set[int] = set()

    def add(self, t: torch.Tensor) -> torch.Tensor:
        # plain tensors only: torch.compile traces with fake / functional tensor subclasses
        if type(t) is torch.Tensor and t.is_floating_point() and not torch.compiler.is_compiling():
            t.fill_(float("nan"))
            if t.numel():
                self._tensors.append(t)
                self._ptrs.add(t.untyped_storage().data_ptr())
        return t

    def poisoned(self, t: torch.Tensor) -> bool:
        """Whether ``t`` (or the tensor it is a view of) was allocated while poisoned."""
        return t.untyped_storage().data_ptr() in self._ptrs


@pytest.fixture
def nan_empty(monkeypatch):
    rec = PoisonRecorder()
    orig = {
        "empty": torch.empty,
        "empty_like": torch.empty_like,
        "empty_strided": torch.empty_strided,
    }
    orig_new_empty = torch.Tensor.new_empty
    for name, fn in orig.items():
        monkeypatch.setattr(torch, name, lambda *a, _fn=fn, **k: rec.add(_fn(*a, **k)))
    monkeypatch.setattr(
        torch.Tensor, "new_empty", lambda self, *a, **k: rec.add(orig_new_empty(self, *a, **k))
    )
    yield rec


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Triton's interpreter for CPU tensors (how the ``triton`` backend runs without a GPU), for
    this test only; skips when triton is not installed."""
    pytest.importorskip("triton", reason="triton is not installed (pip install 'adaspark[triton]')")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_cube_ids(
    bsz: int, n: int, videos: list[list[tuple[int, tuple[int, int, int], tuple[int, int, int]]]]
):
    """``[B, N]`` cube ids from per-sample lists of ``(start, (t, h, w) tokens, cube)`` videos."""
    from adaspark.core.layout import grid_cube_ids

    ids = torch.full((bsz, n), -1, dtype=torch.long)
    for b, vids in enumerate(videos):
        nxt = 0
        for start, (t, h, w), cube in vids:
            local = grid_cube_ids(t, h, w, cube)
            ids[b, start : start + local.numel()] = local + nxt
            nxt += int(local.max()) + 1
    return ids


def causal_pairs(calls: list[tuple[int, int]]) -> int:
    """Causal (query, key) pairs of forward calls given as ``(cached tokens, new tokens)``, batch 1."""
    return sum(sum(cached + j for j in range(1, new + 1)) for cached, new in calls)


def decode_attn_density(full: list[dict], prefill: list[dict], n_prompt: int, steps: list[tuple[int, int]]):
    """Per-layer attention density of the calls after the prefill alone.

    ``full`` / ``prefill``: the ``layers`` of a report (``Report.to_dict()``) covering the prefill plus
    the later calls, and of the same prefill alone; ``steps``: the later calls as ``(cached tokens,
    new tokens)``. A report's ``attn_density`` is attended / causal pairs over all calls, so the later
    calls' share is ``(d_full · C_full − d_prefill · C_prefill) / (C_full − C_prefill)``.
    """
    c_pre = causal_pairs([(0, n_prompt)])
    c_new = causal_pairs(steps)
    return [
        (f["attn_density"] * (c_pre + c_new) - p["attn_density"] * c_pre) / c_new
        for f, p in zip(full, prefill, strict=True)
    ]


def ask_prefill(argv: list[str]) -> tuple[dict, int, list[tuple[int, int]]]:
    """What ``adaspark ask ARGV`` runs, up to its prefill only: ``(report dict of the AdaSpark prefill,
    prompt tokens, the option continuations as (cached, new) tokens)``, for :func:`decode_attn_density`."""
    import adaspark
    from adaspark import cli
    from adaspark.commands import ask
    from adaspark.needle.model import encode_prompt, option_token_ids

    args = cli.build_parser().parse_args(argv)
    config = ask._check(args)
    loaded = ask._load(args)
    model, tokenizer = loaded.model, loaded.tokenizer
    src = ask._source(args, loaded)
    inputs = encode_prompt(loaded, src["video"], src["question"], src["options"])
    kwargs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    n = int(kwargs["input_ids"].shape[1])
    with torch.inference_mode(), adaspark.patch(model, config) as handle:
        model(**kwargs, use_cache=True, logits_to_keep=1)
        rep = handle.report().to_dict()
    steps = [(n, len(ids) - 1) for ids in option_token_ids(tokenizer, src["options"]) if len(ids) > 1]
    return rep, n, steps


_REAL_COST_MODEL = []


@pytest.fixture(autouse=True, scope="session")
def deterministic_costs():
    """Patched models get a cost model that always chooses sparse (a free kernel, dense at 1 s per
    pair), so the tests of the sparse semantics do not depend on this machine's timings and none
    pays for a calibration (session-wide: module-scoped fixtures run models too);
    ``@pytest.mark.real_costs`` tests get the measured one back (``real_costs`` below)."""
    from adaspark.core import calibration
    from adaspark.ops.attention.cost import CostFit, CostModel

    fit = CostFit(dense=1.0, select_fixed=0.0, select=0.0, kernel_fixed=0.0, kernel=1e-12)
    _REAL_COST_MODEL.append(calibration.cost_model)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(calibration, "cost_model", lambda **kw: CostModel(measure=lambda **k: fit))
        yield


@pytest.fixture(autouse=True)
def real_costs(request, monkeypatch):
    if request.node.get_closest_marker("real_costs") is not None:
        from adaspark.core import calibration

        monkeypatch.setattr(calibration, "cost_model", _REAL_COST_MODEL[0])
    yield
