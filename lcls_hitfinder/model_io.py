"""The embedder model file, defined once: ONNX graph names, metadata keys, export and identity.

An embedder maps thumbnails `thumbnail` (N, 1, S, S) float32 to embeddings `embedding` (N, D) float32,
with a dynamic batch axis. Its metadata carries the preprocessing settings (so serving feeds it exactly
as training did) and a training summary. A model is identified by the SHA-256 of its file; banks
record that hash and refuse other models.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

from lcls_hitfinder.errors import UserError
from lcls_hitfinder.preprocess import PreprocessSettings

INPUT_NAME = "thumbnail"
OUTPUT_NAME = "embedding"
META_PREPROCESS = "lcls_hitfinder.preprocess"
META_SUMMARY = "lcls_hitfinder.training_summary"
META_EMBED_DIM = "lcls_hitfinder.embed_dim"
OPSET = 18


def file_hash(path: Path | str) -> str:
    """Short SHA-256 of a model file: what banks and decisions name the model by."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    model_hash: str
    preprocess: PreprocessSettings
    embed_dim: int
    summary: dict[str, Any]


def export_onnx(
    module: torch.nn.Module,
    preprocess: PreprocessSettings,
    out: Path | str,
    summary: dict[str, Any] | None = None,
) -> ModelInfo:
    """Export `module` (thumbnails -> embeddings) with a dynamic batch axis and our metadata."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval().cpu()
    s = preprocess.thumbnail
    example = torch.zeros(2, 1, s, s)
    with torch.no_grad():
        embed_dim = int(module(example).shape[1])
    torch.onnx.export(
        module,
        (example,),
        str(out),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
    )
    model = onnx.load(str(out))
    meta = {
        META_PREPROCESS: preprocess.model_dump_json(),
        META_SUMMARY: json.dumps(summary or {}),
        META_EMBED_DIM: str(embed_dim),
    }
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(out))
    return read_model_info(out)


def read_model_info(path: Path | str) -> ModelInfo:
    """Metadata of an exported embedder, without building an inference session."""
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # onnx raises several unrelated types for unreadable files
        raise UserError(f"cannot read model {path}: {err}") from None
    meta = {p.key: p.value for p in model.metadata_props}
    if META_PREPROCESS not in meta:
        raise UserError(f"{path} is not an lcls-hitfinder embedder (no {META_PREPROCESS} metadata)")
    return ModelInfo(
        path=path,
        model_hash=file_hash(path),
        preprocess=PreprocessSettings.model_validate_json(meta[META_PREPROCESS]),
        embed_dim=int(meta.get(META_EMBED_DIM, "0")),
        summary=json.loads(meta.get(META_SUMMARY, "{}")),
    )
