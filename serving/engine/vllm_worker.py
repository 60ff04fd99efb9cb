"""Runs inside vLLM's workers (`worker_extension_cls`): the draft's weights replaced in place, from a
safetensors file the replica wrote, between two engine steps. Imports vLLM only when called, so
that naming this class costs the worker nothing."""

from __future__ import annotations

import time


class DraftSwap:
    """Mixed into vLLM's worker class: methods `collective_rpc` can call by name."""

    def osd_load_draft(self, path: str) -> float:
        """Copy the draft weights in `path` (checkpoint names, as a Hugging Face draft's
        state_dict) into the live draft model; returns the seconds the copy took."""
        from safetensors.torch import load_file
        from vllm.model_executor.model_loader.reload.inplace import reload_weights

        weights = load_file(path)
        began = time.perf_counter()
        draft = self.model_runner.get_draft_model()
        if draft is None:
            raise RuntimeError("this vLLM engine has no draft model to load weights into")
        reload_weights(
            self.vllm_config, draft, weights_iterator=iter(weights.items()), weights_path=None,
            is_checkpoint_format=True,
        )  # fmt: skip
        return time.perf_counter() - began
