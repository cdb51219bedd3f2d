"""The embedder in onnxruntime: provider fallback TensorRT -> CUDA -> CPU, IO binding on the GPU.

The providers the user prefers are filtered by what this onnxruntime build offers, and a session is
built with the first that works: a TensorRT or CUDA provider that fails to initialise (no driver, no
libnvinfer) falls through to the next. The provider in use is logged and exported in
hitfinder_build_info. On CUDA, thumbnails already on the GPU are bound to the session by pointer
(IO binding), so they never travel to the host; the small (B, D) embeddings come back for the bank.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from lcls_hitfinder.errors import UserError
from lcls_hitfinder.model_io import INPUT_NAME, OUTPUT_NAME, ModelInfo, read_model_info

log = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEFAULT_PROVIDERS = (TENSORRT, CUDA, CPU)
SHORT_NAMES = {"tensorrt": TENSORRT, "trt": TENSORRT, "cuda": CUDA, "cpu": CPU}
_GPU_PROVIDERS = (TENSORRT, CUDA)


def full_provider_name(name: str) -> str:
    """TensorrtExecutionProvider for tensorrt (or trt), and so on; ValueError for a name onnxruntime does not know
    (a typo would otherwise mean the CPU)."""
    full = SHORT_NAMES.get(name.lower(), name)
    if full not in ort.get_all_providers():
        raise ValueError(f"unknown onnxruntime provider {name!r} (use tensorrt, cuda, cpu or a full provider name)")
    return full


def select_providers(preferred: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """The preferred providers (full or short names) that this build has, in order, always ending with CPU.
    A name onnxruntime does not know is refused; one it knows but this build lacks is said, and skipped."""
    chain = []
    for name in preferred or DEFAULT_PROVIDERS:
        try:
            full = full_provider_name(name)
        except ValueError as err:
            raise UserError(str(err)) from None
        if full in available and full not in chain:
            chain.append(full)
        elif preferred and full not in available:
            log.warning("onnxruntime provider %s is not in this build (it has %s): skipped", full, ", ".join(available))
    if CPU not in chain:
        chain.append(CPU)
    return chain


def provider_options(provider: str, info: ModelInfo, max_batch: int, device_id: int) -> dict[str, Any]:
    """Options per provider: TensorRT gets the dynamic batch range and an engine cache (builds take minutes).

    The cache is one folder per model (by the hash of its contents) and batch range: onnxruntime names an engine
    by the model's file name and graph, not its weights, so a retrained model of the same name would run the
    old engine's weights, and another batch range would rebuild the engine each time."""
    thumbnail = info.preprocess.thumbnail
    if provider == TENSORRT:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lcls-hitfinder" / "tensorrt"
        cache = base / info.model_hash / f"batch{max_batch}"
        cache.mkdir(parents=True, exist_ok=True)
        shape = f"1x{thumbnail}x{thumbnail}"
        return {
            "device_id": device_id,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_profile_min_shapes": f"{INPUT_NAME}:1x{shape}",
            "trt_profile_opt_shapes": f"{INPUT_NAME}:{max_batch}x{shape}",
            "trt_profile_max_shapes": f"{INPUT_NAME}:{max_batch}x{shape}",
        }
    if provider == CUDA:
        # cuDNN's exhaustive search would benchmark its convolutions anew for each batch size dynamic batching
        # makes (1 to max_batch): a latency spike each first time
        return {"device_id": device_id, "cudnn_conv_algo_search": "HEURISTIC"}
    return {}


class OnnxEmbedder:
    """Thumbnails (B, 1, S, S) -> embeddings (B, D) as numpy, with the best provider that works here."""

    def __init__(
        self,
        model: Path,
        providers: Sequence[str] | None = None,
        max_batch: int = 32,
        threads: int = 0,
        device_id: int = 0,
    ) -> None:
        info = read_model_info(model)
        self.info = info
        self.model_hash = info.model_hash
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # onnxruntime's idle threads spin by default, stealing the cores that torch's preprocessing of the
        # next batch needs: the service alternates the two, so they must sleep when idle.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        chain = select_providers(providers, ort.get_available_providers())
        self.session: ort.InferenceSession | None = None
        self.max_batch = max_batch
        for i, first in enumerate(chain):
            try:  # the options too: TensorRT's engine cache folder may not be writable
                tried = [(p, provider_options(p, info, max_batch, device_id)) for p in chain[i:]]
                # enable_fallback=0: onnxruntime's own fallback would retry CUDA then CPU without the options
                # and without a word here, at the session's creation and at any run() after an EP failure
                self.session = ort.InferenceSession(str(model), options, providers=tried, enable_fallback=0)
                break
            except Exception as err:  # onnxruntime raises its own unrelated types per provider
                log.warning("onnxruntime provider %s failed (%s); trying the next", first, err)
        if self.session is None:
            raise UserError(f"cannot load model {model} with any of {', '.join(chain)}")
        self.provider = self.session.get_providers()[0]
        self.embed_dim = info.embed_dim or int(self.session.get_outputs()[0].shape[1])
        self.device_id = device_id
        log.info("model %s (%s) runs on %s", model, self.model_hash, self.provider)

    @property
    def on_gpu(self) -> bool:
        return self.provider in _GPU_PROVIDERS

    def embed(self, thumbnails: torch.Tensor | np.ndarray) -> np.ndarray:
        """Embeddings of any number of thumbnails, in batches of at most `max_batch`: TensorRT's engine is
        built for that range (offline commands embed 256 at a time)."""
        assert self.session is not None
        if len(thumbnails) > self.max_batch:
            step = self.max_batch
            return np.concatenate([self.embed(thumbnails[i : i + step]) for i in range(0, len(thumbnails), step)])
        if isinstance(thumbnails, torch.Tensor) and thumbnails.is_cuda and self.on_gpu:
            return self._embed_bound(thumbnails)
        x = thumbnails.detach().cpu().numpy() if isinstance(thumbnails, torch.Tensor) else thumbnails
        (out,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, np.float32)})
        return np.asarray(out)

    def _embed_bound(self, thumbnails: torch.Tensor) -> np.ndarray:
        """IO binding: the session reads the torch tensor's memory and writes into another torch tensor.

        Used for CUDA tensors (no host round trip); the same binding works for CPU tensors, which is how
        the tests check it on a machine without a GPU.
        """
        assert self.session is not None
        x = thumbnails.contiguous().to(torch.float32)
        out = torch.empty((x.shape[0], self.embed_dim), dtype=torch.float32, device=x.device)
        device_type, device_id = ("cuda", x.device.index or 0) if x.is_cuda else ("cpu", 0)
        binding = self.session.io_binding()
        binding.bind_input(INPUT_NAME, device_type, device_id, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(OUTPUT_NAME, device_type, device_id, np.float32, tuple(out.shape), out.data_ptr())
        if x.is_cuda:
            torch.cuda.current_stream(x.device).synchronize()  # torch's preprocessing must finish before ORT reads
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # onnxruntime's stream must be done before torch reads `out`
        return out.cpu().numpy()
