"""The lmms-eval model ``adaspark_qwen2_5_vl``: a Qwen2.5-VL / Qwen2-VL checkpoint run with AdaSpark.

Imported by lmms-eval only (this module imports ``lmms_eval``). Registered through the entry point
group ``lmms_eval.models`` (see :func:`adaspark.integrations.lmms_eval.model_manifest`), so after
``pip install 'adaspark[lmms]'``::

    python -m lmms_eval --model adaspark_qwen2_5_vl \\
        --model_args pretrained=/path/to/Qwen2.5-VL-7B-Instruct,p=0.5,cube=4x4x4 \\
        --tasks videomme --batch_size 1

``--model_args``: see :data:`adaspark.integrations.lmms_eval.runner.MODEL_ARGS` (every
:class:`~adaspark.config.AdaSparkConfig` field, ``dense=true``, video sampling, ``report_path``).
Each request is one video and a prompt; the answer is generated greedily (or as the task's
``generation_kwargs`` say) under :func:`adaspark.patch`, ``--batch_size`` requests per ``generate``
call, and the AdaSpark report of each call (FLOPs dense / executed, saved fraction, densities) is
kept.

Data parallel, like lmms-eval's own models: ``accelerate launch --num_processes N -m lmms_eval
--model adaspark_qwen2_5_vl ...`` (or ``torchrun``). The model creates an ``accelerate.Accelerator``,
runs on ``cuda:<local rank>`` and reports ``rank`` / ``world_size``; lmms-eval's evaluator deals the
documents to the ranks and gathers answers and metrics on rank 0. Give every rank the same
``report_path``: records are appended under a file lock.
"""

from __future__ import annotations

import sys

from lmms_eval.api.model import lmms

from adaspark.integrations.lmms_eval.runner import Runner, answer_requests, parse_model_args, rank_device

__all__ = ["AdaSparkQwen2_5_VL"]


class AdaSparkQwen2_5_VL(lmms):
    """lmms-eval "simple" model: ``doc_to_visual`` gives the video path, ``doc_to_text`` the prompt."""

    is_simple = True

    def __init__(self, **model_args) -> None:
        import dataclasses

        from accelerate import Accelerator  # an lmms-eval dependency

        super().__init__()
        settings = parse_model_args(model_args)
        self.accelerator = Accelerator()
        world = self.accelerator.num_processes
        device = rank_device(settings.device, self.accelerator.local_process_index, world)
        self.settings = dataclasses.replace(settings, device=device)
        self._rank = self.accelerator.process_index if world > 1 else 0
        self._world_size = world
        self.runner = Runner(self.settings)

    @property
    def device(self):
        """This rank's torch device (lmms-eval's evaluator puts its rank-count tensors on it)."""
        return self.runner.device

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def records(self) -> list[dict]:
        """One AdaSpark record per answered request (see :meth:`Runner.answer`)."""
        return self.runner.records

    def generate_until(self, requests) -> list[str]:
        answers = answer_requests(self.runner, requests, self.task_dict, progress=self.rank == 0)
        for req, answer in zip(requests, answers, strict=True):
            self.cache_hook.add_partial("generate_until", (req.args[0], req.args[1]), answer)
        if requests:
            s = self.runner.summary()
            print(
                f"adaspark_qwen2_5_vl ({s['mode']}): {s['requests']} requests, "
                f"{s['flops'] / 1e9:.3f} of {s['flops_dense'] / 1e9:.3f} GFLOP, saved {s['saved']:.1%} "
                f"(decoder {s['decoder_saved']:.1%})",
                file=sys.stderr,
            )
        return answers

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "adaspark_qwen2_5_vl implements generate_until only (video multiple-choice tasks such as "
            "videomme and mlvu_dev); loglikelihood tasks are not supported"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("adaspark_qwen2_5_vl does not support multi-round generation tasks")
