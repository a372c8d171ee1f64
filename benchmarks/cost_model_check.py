"""How well the attention cost model predicts one model's prefill, layer by layer (not a test).

Runs one prefill of a needle video under ``AdaSparkConfig(p=P)`` (cost model on), keeps every decoder
layer's attention inputs, then for each layer times — interleaved, on those very inputs — dense SDPA,
the selection (``prepare_inputs`` + the pre-selection estimate + ``plan_blocks``) and the block
kernel on the plan, and prints them beside what the cost model predicted and decided::

    OMP_NUM_THREADS=1 python benchmarks/cost_model_check.py --model smolvl --frames 512 --p 0.5

A decision is *right* when it picks the faster of dense and (selection + kernel) as measured; the
summary gives the time the model's decisions cost against the best per-layer choice.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

import torch

import adaspark
import adaspark.ops.attention as attn_ops
from adaspark.core import calibration
from adaspark.needle import make_item, render_frames
from adaspark.needle import model as nm
from adaspark.ops.attention import BLOCK_KERNELS, dense_causal_attention
from adaspark.ops.attention.blocks import plan_blocks, run_blocks
from adaspark.ops.attention.common import causal_valid_pairs, prepare_inputs
from adaspark.ops.attention.cost import CostModel, estimate_executed

from _bench import machine, markdown_table, median_time, write_outputs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smolvl", help="tiny, smolvl or a checkpoint directory")
    ap.add_argument("--frames", type=int, default=512)
    ap.add_argument("--task", default="retrieval")
    ap.add_argument("--p", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    loaded = nm.load_model(args.model)
    item = make_item(args.task, args.frames, 0, split="test")
    video = loaded.preprocess(render_frames(item), item.fps)
    inputs = nm.encode_prompt(loaded, video, item.question, item.options)
    kw = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    ntok = int(kw["input_ids"].shape[1])
    print(f"machine: {machine()}\nmodel: {loaded.source}\n{ntok}-token prompt", flush=True)

    calls = []
    original = attn_ops._cost_decided

    def recording(q, k, v, cube_ids, p, name, cost_model, *, stats, block, **kwargs):
        calls.append((q, k, v, cube_ids, p, name, block, kwargs))
        return original(q, k, v, cube_ids, p, name, cost_model, stats=stats, block=block, **kwargs)

    cfg = adaspark.AdaSparkConfig(p=args.p)
    attn_ops._cost_decided = recording
    try:
        with adaspark.patch(loaded.model, cfg):
            loaded.model(**kw, use_cache=False, logits_to_keep=1)
    finally:
        attn_ops._cost_decided = original
    if not calls:
        raise SystemExit("error: no prefill went through the cost model (is the prompt long enough?)")
    model: CostModel = calibration.cost_model()
    rows = []
    for li, (q, k, v, cube_ids, p, name, block, kwargs) in enumerate(calls):
        inp = prepare_inputs(q, k, v, cube_ids, p, **kwargs)
        key = CostModel.key(
            hq=inp.hq, hkv=inp.hkv, d=inp.d, dtype=q.dtype, device=q.device,
            granularity=inp.granularity, kernel=name,
        )  # fmt: skip
        fit = model.fit(key)
        pairs = float(causal_valid_pairs(inp.key_mask, inp.nq).sum())
        cubes = max(inp.index.max_cubes, 1)
        estimate = estimate_executed(q, inp, pairs)
        plan = plan_blocks(q, inp, block=block)
        dense_kw = {"scale": inp.scale, "key_mask": kwargs.get("key_mask")}

        def dense(q=q, k=k, v=v, dense_kw=dense_kw):
            dense_causal_attention(q, k, v, **dense_kw)

        def select(q=q, k=k, v=v, cube_ids=cube_ids, p=p, kwargs=kwargs, pairs=pairs, block=block):
            i = prepare_inputs(q, k, v, cube_ids, p, **kwargs)
            estimate_executed(q, i, pairs)
            plan_blocks(q, i, block=block)

        def kernel(q=q, k=k, v=v, plan=plan, name=name):
            run_blocks(q, k, v, plan, kernel=BLOCK_KERNELS[name])

        for fn in (dense, select, kernel):
            fn()  # warm-up
        t = {"dense": [], "select": [], "kernel": []}
        for _ in range(args.repeats):
            for nm_, fn in (("dense", dense), ("select", select), ("kernel", kernel)):
                t[nm_].append(median_time(fn, 1, warmup=False))
        td, ts, tk = (statistics.median(t[x]) for x in ("dense", "select", "kernel"))
        pd = fit.dense_time(pairs, inp.hq, inp.d)
        ps = fit.select_time(inp.bsz * inp.nq, cubes, inp.hq, inp.d)
        pk_before = fit.kernel_time(estimate, inp.d)
        pk = fit.kernel_time(plan.executed, inp.d)
        before_dense = ps + pk_before >= model.margin * pd
        after_dense = pk >= model.margin * pd
        decision = "dense-before" if before_dense else ("dense-after" if after_dense else "sparse")
        measured_sparse = ts + tk
        took = {"dense-before": td, "dense-after": ts + td, "sparse": measured_sparse}[decision]
        best = min(td, measured_sparse)
        rows.append(
            {
                "layer": li,
                "density": plan.executed / (pairs * inp.hq),
                "est_ratio": plan.executed / max(estimate, 1.0),
                "dense_s": td,
                "dense_pred": pd,
                "select_s": ts,
                "select_pred": ps,
                "kernel_s": tk,
                "kernel_pred": pk,
                "kernel_pred_before": pk_before,
                "decision": decision,
                "best": "sparse" if measured_sparse < td else "dense",
                "took_s": took,
                "best_s": best,
            }
        )
        r = rows[-1]
        print(
            f"layer {li:2d}: density {r['density']:.3f}  dense {td:.3f} s (pred {pd:.3f})  "
            f"select {ts:.3f} (pred {ps:.3f})  kernel {tk:.3f} (pred {pk:.3f}, before {pk_before:.3f})  "
            f"-> {decision}, best {r['best']}",
            flush=True,
        )
    cols = [
        ("layer", "layer", "d"),
        ("density", "executed density", ".3f"),
        ("est_ratio", "plan / estimate", ".2f"),
        ("dense_s", "dense s", ".3f"),
        ("dense_pred", "dense pred", ".3f"),
        ("select_s", "select s", ".3f"),
        ("select_pred", "select pred", ".3f"),
        ("kernel_s", "kernel s", ".3f"),
        ("kernel_pred", "kernel pred", ".3f"),
        ("kernel_pred_before", "kernel pred before", ".3f"),
        ("decision", "decision", ""),
        ("best", "best", ""),
    ]
    took, best = sum(r["took_s"] for r in rows), sum(r["best_s"] for r in rows)
    dense_all = sum(r["dense_s"] for r in rows)
    right = sum((r["decision"] == "sparse") == (r["best"] == "sparse") for r in rows)
    summary = (
        f"\n{right}/{len(rows)} decisions right. Attention time over the layers: all dense "
        f"{dense_all:.2f} s, the cost model's decisions {took:.2f} s, best per layer {best:.2f} s "
        f"(all sparse {sum(r['select_s'] + r['kernel_s'] for r in rows):.2f} s).\n"
    )
    table = f"## Per layer, p = {args.p}, {ntok} tokens\n\n" + markdown_table(rows, cols) + summary
    print()
    print(table)
    name = args.name or f"cost_model_check_{Path(str(args.model)).name}_{args.frames}f"
    meta = {
        "title": "Attention cost model: predicted vs measured, per layer",
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "machine": machine(),
        "model": loaded.source,
    }
    for pth in write_outputs(args.out, name, meta, rows, table, None):
        print(f"wrote {pth}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
