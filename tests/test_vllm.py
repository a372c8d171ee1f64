"""AdaSpark inside vLLM (``adaspark.integrations.vllm``), in-process, eager, fp32, the shipped needle model.

Skipped without vLLM (the normal test environment has none; ``.ci/run`` builds a vLLM environment
and runs this file there). The references: stock vLLM (the architecture of the checkpoint) and
transformers with and without :func:`adaspark.patch` on the same processor outputs.

* dense (p = 1) AdaSpark vLLM equals transformers on a video prompt (vLLM's own M-RoPE positions do
  not: the text after a video is placed differently);
* p = 1 through a sparse kernel equals stock vLLM (a short video, on which both position
  conventions agree); p = 1 with ``backend="auto"`` leaves every kernel of stock vLLM in place;
* p = 0.5 gives transformers-AdaSpark's greedy tokens and log-probabilities (AdaSpark in the
  prefill and in every decode step, in both) and saves what transformers' report says, in the
  prefill and in the decoding;
* in a batch with a video request, a text request is bit-identical to stock vLLM's, prefill and
  decoding; the video contexts kept for decoding are dropped once their requests are done;
* invalid settings stop the engine at start with one clear error.
"""

from __future__ import annotations

import gc
import os

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (see README: Serving with vLLM)")

import torch
from vllm import LLM, SamplingParams

from adaspark import AdaSparkConfig
from adaspark.integrations.vllm import ARCHITECTURE, hf_overrides, prompt_digest, register
from adaspark.needle import make_item, render_frames
from adaspark.needle.model import DEFAULT_MODEL_DIR

# read by vLLM when an engine starts: a 1 GiB KV cache, the engine core in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

PROMPT = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n"
TEXT_PROMPT = "<|im_start|>user\nwhat colour was the shape ?<|im_end|>\n<|im_start|>assistant\n"
ENGINE = dict(
    model=str(DEFAULT_MODEL_DIR),
    dtype="float32",
    enforce_eager=True,
    max_model_len=4096,
    limit_mm_per_prompt={"video": 1, "image": 0},
    seed=0,
    enable_chunked_prefill=False,
    enable_prefix_caching=False,
)
GREEDY = SamplingParams(temperature=0, max_tokens=6, logprobs=1)
#: several decode steps: the needle model answers in one word and stops
DECODE = SamplingParams(temperature=0, max_tokens=6, logprobs=1, ignore_eos=True)


@pytest.fixture(scope="module")
def item():
    return make_item("retrieval", 32, 0, split="test")


def _video(frames, fps):
    n = frames.shape[0]
    meta = {"fps": fps, "total_num_frames": n, "duration": n / fps, "frames_indices": list(range(n))}
    return frames, meta


@pytest.fixture(scope="module")
def video_request(item):
    frames = render_frames(item)
    return {"prompt": PROMPT.format(q=item.question), "multi_modal_data": {"video": _video(frames, item.fps)}}


@pytest.fixture(scope="module")
def short_request(item):
    """A 4-frame video: grid (2, 4, 4), where vLLM's and transformers' M-RoPE positions agree."""
    frames = render_frames(item)[:4]
    return {"prompt": PROMPT.format(q=item.question), "multi_modal_data": {"video": _video(frames, item.fps)}}


class _Engines:
    """One vLLM engine alive at a time (each holds a KV cache), made on demand and cached by name."""

    def __init__(self) -> None:
        self.name = None
        self.llm = None

    def get(self, name: str, overrides: dict | None) -> LLM:
        if self.name != name:
            self.close()
            self.llm = LLM(**ENGINE, **({"hf_overrides": overrides} if overrides else {}))
            self.name = name
        return self.llm

    def close(self) -> None:
        self.llm = self.name = None
        gc.collect()


@pytest.fixture(scope="module")
def engines():
    e = _Engines()
    yield e
    e.close()


def _run(llm, requests, params=GREEDY):
    return [
        (list(o.outputs[0].token_ids), _logprobs(o)) for o in llm.generate(requests, params, use_tqdm=False)
    ]


def _logprobs(out):
    return [d[t].logprob for d, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids, strict=True)]


def _reports(llm, kind="prefill"):
    return [r for r in llm.apply_model(lambda m: list(m.adaspark_reports))[0] if r["kind"] == kind]


def _stored(llm) -> int:
    return llm.apply_model(lambda m: len(m.adaspark_store))[0]


def _next_step(llm) -> None:
    """One engine step without the earlier requests (a one-token text request): the step at which
    the model sees they are gone and drops their video contexts."""
    llm.generate([{"prompt": TEXT_PROMPT}], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)


def _greedy(model, inputs, steps, config=None, *, sparse_decode=False, ignore_eos=False):
    """Greedy decoding in transformers with explicit M-RoPE positions: the prompt's from
    ``get_rope_index``, generated tokens after the prompt's largest position (what a forward over the
    whole sequence gives them, and what vLLM does; transformers 5.19's ``generate`` places the
    first generated token elsewhere). ``config``: the prefill runs under :func:`adaspark.patch`,
    and with ``sparse_decode`` every decode step too (else decoding is dense). Returns tokens,
    log-probabilities, the prefill's report and the report of prefill and decoding together."""
    from contextlib import ExitStack

    from adaspark import patch

    pos, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        video_grid_thw=inputs["video_grid_thw"], second_per_grid_ts=inputs["second_per_grid_ts"],
    )  # fmt: skip
    nxt = int(pos.max()) + 1
    eos = int(model.config.get_text_config().eos_token_id)
    with torch.inference_mode(), ExitStack() as stack:
        handle = stack.enter_context(patch(model, config)) if config is not None else None
        out = model(**inputs, use_cache=True)
        rep = handle.report() if handle is not None else None
        if not sparse_decode:
            stack.close()
        cache = out.past_key_values
        tokens, lps = [], []
        logits = out.logits[0, -1]
        for i in range(steps):
            lp = torch.log_softmax(logits.float(), -1)
            tok = int(lp.argmax())
            tokens.append(tok)
            lps.append(float(lp[tok]))
            if (tok == eos and not ignore_eos) or i == steps - 1:
                break
            step = model(
                input_ids=torch.tensor([[tok]]), past_key_values=cache,
                position_ids=torch.full((3, 1, 1), nxt + i), use_cache=True,
            )  # fmt: skip
            cache, logits = step.past_key_values, step.logits[0, -1]
        total = handle.report() if handle is not None and sparse_decode else None
    return tokens, lps, rep, total


@pytest.fixture(scope="module")
def transformers_ref(item):
    """Greedy tokens and log-probabilities of transformers: dense, and AdaSpark p = 0.5 in the prefill."""
    from transformers import AutoProcessor

    from adaspark.needle.model import load_model

    frames = render_frames(item)
    proc = AutoProcessor.from_pretrained(DEFAULT_MODEL_DIR)
    _, meta = _video(frames, item.fps)
    inputs = proc(
        text=[PROMPT.format(q=item.question)], videos=[frames], video_metadata=[meta],
        return_tensors="pt", do_sample_frames=False,
    )  # fmt: skip
    model = load_model().model.eval()
    cfg = AdaSparkConfig(p=0.5)
    steps = GREEDY.max_tokens
    dense = _greedy(model, inputs, steps)
    sparse = _greedy(model, inputs, steps, cfg, sparse_decode=True)
    long = dict(steps=DECODE.max_tokens, ignore_eos=True)
    decode = _greedy(model, inputs, config=cfg, sparse_decode=True, **long)
    tc = model.config.get_text_config()
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    video = int((inputs["input_ids"] == model.config.video_token_id).sum())
    return {
        "dense": dense[:2],
        "sparse": sparse[:2],
        "sparse_report": sparse[2],
        "prompt_len": inputs["input_ids"].shape[1],
        # several decode steps: AdaSpark in prefill and decoding, and in the prefill only
        "decode": decode,
        "decode_prefill_only": _greedy(model, inputs, config=cfg, **long)[:2],
        # averaging the video keys into cube mean keys, all layers (FLOPs)
        "mean_key_flops": tc.num_hidden_layers * tc.num_key_value_heads * head_dim * video,
    }


def test_plugin_registers_idempotently():
    from vllm import ModelRegistry

    register()
    register()
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()


def test_dense_equals_transformers(engines, video_request, transformers_ref):
    tokens, lps = _run(engines.get("p1", hf_overrides(AdaSparkConfig(p=1.0))), [video_request])[0]
    ref_tokens, ref_lps = transformers_ref["dense"]
    assert tokens == ref_tokens
    assert lps == pytest.approx(ref_lps, abs=1e-4)


def test_p1_auto_leaves_stock_vllm_in_place(engines, short_request, video_request):
    ours_llm = engines.get("p1", hf_overrides(AdaSparkConfig(p=1.0)))
    ours = _run(ours_llm, [short_request, video_request], DECODE)
    _next_step(ours_llm)
    assert _reports(ours_llm, "decode") == []  # no layer kept mean keys: every decode step was vLLM's
    del ours_llm  # (an engine collected after the next one started would tear down its state)
    stock = _run(engines.get("stock", None), [short_request, video_request], DECODE)
    assert ours[0] == stock[0]  # bit-identical where the positions agree, prefill and 5 decode steps
    # on the 32-frame video stock vLLM's positions differ from transformers': the first answer
    # token's log-probability moves (the reason for the positions override)
    assert abs(ours[1][1][0] - stock[1][1][0]) > 1e-3


def test_p1_sparse_kernel_equals_stock(engines, short_request):
    stock = _run(engines.get("stock", None), [short_request], DECODE)[0]
    cfg = AdaSparkConfig(p=1.0, backend="gather", cube=(1, 2, 2))
    llm = engines.get("p1-gather", hf_overrides(cfg))
    tokens, lps = _run(llm, [short_request], DECODE)[0]
    assert tokens == stock[0]
    assert lps == pytest.approx(stock[1], abs=1e-5)
    rep = _reports(llm)[-1]
    assert rep["video_tokens"] == 32
    assert rep["attn_density"] == pytest.approx(1.0)
    # the selection ran (its overhead is counted) although it kept everything
    assert rep["decoder_flops_adaspark"] > rep["decoder_flops_dense"]
    # so did every decode step's, from the cube mean keys kept beside the paged cache
    assert llm.apply_model(lambda m: dict(m._adaspark.cache_checked))[0] == dict.fromkeys(range(4), True)
    _next_step(llm)
    (dec,) = _reports(llm, "decode")
    assert dec["decode_tokens"] == DECODE.max_tokens - 1 and dec["prompt_digest"] == rep["prompt_digest"]
    assert dec["attn_density"] == pytest.approx(1.0)
    assert dec["decoder_flops_adaspark"] > dec["decoder_flops_dense"]


def test_sparse_equals_transformers_adaspark(engines, video_request, transformers_ref):
    llm = engines.get("p0.5", hf_overrides(AdaSparkConfig(p=0.5)))
    out = llm.generate([video_request], GREEDY, use_tqdm=False)[0]
    tokens, lps = list(out.outputs[0].token_ids), _logprobs(out)
    ref_tokens, ref_lps = transformers_ref["sparse"]
    assert tokens == ref_tokens
    # AdaSpark in the prefill and the decoding, in both
    assert lps == pytest.approx(ref_lps, abs=1e-4)
    assert abs(lps[0] - transformers_ref["dense"][1][0]) > 1e-3  # and it is not the dense one
    rep = _reports(llm)[-1]
    assert rep["prompt_digest"] == prompt_digest(out.prompt_token_ids)
    assert rep["tokens"] == transformers_ref["prompt_len"] and rep["video_tokens"] == 256
    assert 0.1 < rep["decoder_saved"] <= rep["decoder_saved_ideal"]
    assert rep["ffn_active"] < 0.75 and rep["attn_density"] < 1.0
    # the same prefill, counted by the same accounting
    ref = transformers_ref["sparse_report"]
    assert rep["decoder_flops_dense"] == pytest.approx(ref.llm_flops_dense, rel=1e-9)
    assert rep["decoder_saved"] == pytest.approx(ref.llm_saved, abs=1e-3)


def test_sparse_decode_equals_transformers_adaspark(engines, video_request, transformers_ref):
    """Five decode steps after the video prompt (EOS ignored), AdaS-Attn in each, as in transformers."""
    llm = engines.get("p0.5", hf_overrides(AdaSparkConfig(p=0.5)))
    _next_step(llm)  # what earlier tests left
    out = llm.generate([video_request], DECODE, use_tqdm=False)[0]
    tokens, lps = list(out.outputs[0].token_ids), _logprobs(out)
    ref_tokens, ref_lps, ref_prefill, ref_total = transformers_ref["decode"]
    assert len(tokens) == DECODE.max_tokens and tokens == ref_tokens
    assert lps == pytest.approx(ref_lps, abs=1e-4)
    assert ref_total.sparse_decode_steps == DECODE.max_tokens - 1
    # sparse decoding is not dense decoding: transformers with AdaSpark in the prefill only
    # differs from both by more than they differ from each other
    only = transformers_ref["decode_prefill_only"][1]
    gap = max(abs(a - b) for a, b in zip(lps, ref_lps, strict=True))
    assert max(abs(a - b) for a, b in zip(lps[1:], only[1:], strict=True)) > 10 * max(gap, 1e-6)
    assert _stored(llm) == 1
    _next_step(llm)
    assert _stored(llm) == 0
    (dec,) = _reports(llm, "decode")[-1:]
    assert dec["prompt_digest"] == prompt_digest(out.prompt_token_ids)
    assert dec["decode_tokens"] == DECODE.max_tokens - 1
    assert dec["prompt_tokens"] == transformers_ref["prompt_len"]
    assert dec["attn_density"] < 1.0 and 0 < dec["decoder_saved"] <= dec["decoder_saved_ideal"]
    # the same decoding, counted by the same accounting: transformers' report of prefill and
    # decoding minus that of the prefill, less one averaging of the mean keys (transformers' prefill
    # under its cost model does not keep them and its first decode step averages them again; vLLM
    # keeps the prefill's)
    assert dec["decoder_flops_dense"] == pytest.approx(
        ref_total.llm_flops_dense - ref_prefill.llm_flops_dense, rel=1e-9
    )
    ref_sparse = ref_total.llm_flops_sparse - ref_prefill.llm_flops_sparse
    ref_sparse -= transformers_ref["mean_key_flops"]
    assert dec["decoder_flops_adaspark"] == pytest.approx(ref_sparse, rel=1e-6)


def test_mixed_batch_text_is_bit_identical(engines, video_request):
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=2, prompt_logprobs=1, ignore_eos=True)
    text = {"prompt": TEXT_PROMPT}

    def run(llm):
        outs = llm.generate([video_request, text], params, use_tqdm=False)
        prompt_lps = [None if d is None else d for d in outs[1].prompt_logprobs]
        return outs, [list(o.outputs[0].token_ids) for o in outs], [_logprobs(o) for o in outs], prompt_lps

    sparse = engines.get("p0.5", hf_overrides(AdaSparkConfig(p=0.5)))
    _, tok, lps, plps = run(sparse)
    alone = _run(sparse, [video_request], params)[0]
    stock = engines.get("stock", None)
    _, s_tok, s_lps, s_plps = run(stock)
    assert len(tok[1]) == 6  # five decode steps of the text request beside the sparse video request
    assert tok[1] == s_tok[1] and lps[1] == s_lps[1]  # exactly
    assert [None if d is None else {k: v.logprob for k, v in d.items()} for d in plps] == [
        None if d is None else {k: v.logprob for k, v in d.items()} for d in s_plps
    ]
    assert (tok[0], lps[0]) == alone  # the video request as if alone


def test_video_contexts_are_dropped_when_requests_finish(engines, video_request, short_request):
    llm = engines.get("p0.5", hf_overrides(AdaSparkConfig(p=0.5)))
    _next_step(llm)
    assert _stored(llm) == 0
    before = len(_reports(llm, "decode"))
    # the 32-frame request stops after 2 tokens, the 4-frame one runs 6
    short = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    outs = llm.generate([video_request, short_request], [short, DECODE], use_tqdm=False)
    # the first request's context left the store while the second still decoded
    decs = _reports(llm, "decode")[before:]
    assert [d["prompt_digest"] for d in decs] == [prompt_digest(outs[0].prompt_token_ids)]
    assert decs[0]["decode_tokens"] == 1
    assert _stored(llm) == 1
    _next_step(llm)
    assert _stored(llm) == 0
    last = _reports(llm, "decode")[-1]
    assert last["prompt_digest"] == prompt_digest(outs[1].prompt_token_ids) and last["decode_tokens"] == 5


def test_paged_kv_reader_matches_vllm_cpu_cache_writes():
    """What vLLM's CPU attention writes into its paged cache (float32, its ISA here) reads back
    with :func:`read_paged_kv`."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from adaspark.integrations.vllm.paged import read_paged_kv

    nb, hkv, bs, d, n = 5, 2, 32, 32, 70
    torch.manual_seed(0)
    cache = torch.full((nb, hkv, bs, 2 * d), float("nan"))
    key_cache, value_cache = cache.view(nb, hkv, 2 * bs, d).chunk(2, dim=2)
    k, v = torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    blocks = torch.tensor([3, 0, 4], dtype=torch.int32)
    slots = blocks.long().repeat_interleave(bs)[:n] * bs + torch.arange(n) % bs
    isa = _get_attn_isa(torch.float32, bs, d)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
    got_k, got_v = read_paged_kv(cache, blocks, n)
    assert torch.equal(got_k[0], k.transpose(0, 1)) and torch.equal(got_v[0], v.transpose(0, 1))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"architectures": [ARCHITECTURE], "adaspark": {"p": 1.5}}, r"AdaSparkConfig\.p must be in \(0, 1\]"),
        ({"architectures": [ARCHITECTURE], "adaspark": {"cube": "4x4"}}, r"cube"),
        ({"architectures": [ARCHITECTURE], "adaspark": {"pp": 0.5}}, r"pp: not an AdaSparkConfig field"),
    ],
)
def test_bad_config_stops_the_engine(engines, overrides, match):
    engines.close()
    with pytest.raises(ValueError, match=match):
        LLM(**ENGINE, hf_overrides=overrides)


def test_chunked_prefill_is_refused(engines):
    engines.close()
    with pytest.raises(ValueError, match="chunked prefill is on"):
        LLM(**{**ENGINE, "enable_chunked_prefill": True}, hf_overrides=hf_overrides(AdaSparkConfig(p=0.5)))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_answers_a_chat_request_with_a_video(engines, item, tmp_path):
    """vLLM's OpenAI-compatible server with the plugin, as a user starts it; one chat request with a
    video on loopback. (``vllm serve`` is that server; vllm-cpu 0.32.0's ``vllm`` command dies on
    ``importlib.metadata.version("vllm")`` — its distribution is named ``vllm-cpu`` — so the server
    is started as ``python -m vllm.entrypoints.openai.api_server``.)"""
    import base64
    import json
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from adaspark.needle import write_split
    from adaspark.needle.storage import video_path

    engines.close()
    write_split([item], tmp_path / "split")
    mp4 = video_path(item, tmp_path / "split").read_bytes()
    report = tmp_path / "reports.jsonl"
    port = _free_port()
    template = Path(__file__).parent / "fixtures" / "needle_chat_template.jinja"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(DEFAULT_MODEL_DIR),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "4096", "--no-enable-chunked-prefill", "--no-enable-prefix-caching",
        "--limit-mm-per-prompt", json.dumps({"video": 1, "image": 0}), "--chat-template", str(template),
        "--hf-overrides", json.dumps(hf_overrides(AdaSparkConfig(p=0.5), report_path=str(report))),
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    log = tmp_path / "serve.log"
    with open(log, "wb") as fh:
        server = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, f"vllm serve exited:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"vllm serve did not start:\n{log.read_text()[-3000:]}"
            time.sleep(2)
        url = "data:video/mp4;base64," + base64.b64encode(mp4).decode()
        body = {
            "model": str(DEFAULT_MODEL_DIR),
            "temperature": 0,
            "max_tokens": 6,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "video_url", "video_url": {"url": url}},
                        {"type": "text", "text": item.question},
                    ],
                }
            ],
        }
        req = urllib.request.Request(
            f"{base}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    text = answer["choices"][0]["message"]["content"].strip()
    assert text == item.options[item.answer], answer
    records = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(records) == 1 and records[0]["video_tokens"] == 256
    assert records[0]["decoder_saved"] > 0.1
    assert "AdaSpark prefill" in log.read_text()
