"""The embedder model file, defined once: ONNX graph names, metadata keys, export and identity.

An embedder maps thumbnails `thumbnail` (N, 1, S, S) float32 to embeddings `embedding` (N, D) float32,
with a dynamic batch axis; it may average the embeddings of the thumbnail's 90-degree rotations inside the
graph (`with_rotations`), so every user of the file embeds alike. Its metadata carries the preprocessing
settings (so serving feeds it exactly as training did) and a training summary. A model is identified by the
SHA-256 of its file; banks record that hash and refuse other models.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from onnx.compose import add_prefix

from lcls_hitfinder.errors import UserError
from lcls_hitfinder.preprocess import PreprocessSettings

INPUT_NAME = "thumbnail"
OUTPUT_NAME = "embedding"
META_PREPROCESS = "lcls_hitfinder.preprocess"
META_SUMMARY = "lcls_hitfinder.training_summary"
META_EMBED_DIM = "lcls_hitfinder.embed_dim"
OPSET = 18
VIEWS = (1, 2, 4)  # 90-degree rotations a model may average over: the identity, a quarter turn, all four


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

    @property
    def views(self) -> int:
        """How many 90-degree rotations of each thumbnail the model averages over (1: none)."""
        return int(self.summary.get("views", 1))


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
    if (path / "run.json").is_file():  # a training run's directory, not yet exported
        raise UserError(f"{path} is a training run: export it first (`lcls-hitfinder export {path} --out MODEL.onnx`)")
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


def check_views(views: int) -> int:
    """`views`, if a model may average over that many quarter turns."""
    if views not in VIEWS:
        raise UserError(f"views must be one of {', '.join(map(str, VIEWS))}, not {views}")
    return views


def rotations(thumbnails: np.ndarray, views: int) -> list[np.ndarray]:
    """The first `views` quarter turns of (N, 1, S, S) thumbnails, as `with_rotations` computes them."""
    return [np.ascontiguousarray(np.rot90(thumbnails, k, axes=(2, 3))) for k in range(views)]


def with_rotations(model: Path | str, views: int, out: Path | str) -> ModelInfo:
    """Write `model` as one that embeds a thumbnail as the mean of the embeddings of its first `views`
    quarter turns.

    Why: the embedder learns rotation invariance only from augmentation, and averaging over exact rotations
    (interpolation-free on a square thumbnail) raised single-hit precision on validation sets for every
    model measured, though not on every test set (docs/RESULTS.md, "Embeddings averaged over rotations").
    The rotations run inside the graph (one batch of views * N through the network), so the bank, serving
    and offline tools need not know.
    """
    check_views(views)
    info = read_model_info(model)
    if info.views != 1:
        raise UserError(f"{model} already averages over {info.views} rotations")
    plain = onnx.load(str(model))
    inner = add_prefix(plain, "plain/")
    dim = info.embed_dim
    consts = {
        "flip_start": [-1],
        "flip_end": [np.iinfo(np.int64).min],
        "flip_axis": [3],
        "flip_step": [-1],
        "views_shape": [views, -1, dim],
        "views_axis": [0],
    }
    inits = [numpy_helper.from_array(np.array(v, np.int64), f"rot/{k}") for k, v in consts.items()]
    nodes, turned = [], [INPUT_NAME]
    for k in range(1, views):  # a quarter turn more than the last: flip the columns, then transpose
        flip = ["rot/flip_start", "rot/flip_end", "rot/flip_axis", "rot/flip_step"]
        nodes.append(helper.make_node("Slice", [turned[-1], *flip], [f"rot/flipped{k}"]))
        nodes.append(helper.make_node("Transpose", [f"rot/flipped{k}"], [f"rot/turned{k}"], perm=[0, 1, 3, 2]))
        turned.append(f"rot/turned{k}")
    nodes.append(helper.make_node("Concat", turned, [f"plain/{INPUT_NAME}"], axis=0))
    nodes.extend(inner.graph.node)
    nodes.append(helper.make_node("Reshape", [f"plain/{OUTPUT_NAME}", "rot/views_shape"], ["rot/by_view"]))
    nodes.append(helper.make_node("ReduceMean", ["rot/by_view", "rot/views_axis"], [OUTPUT_NAME], keepdims=0))
    graph = helper.make_graph(
        nodes,
        f"{plain.graph.name}_rotations{views}",
        [plain.graph.input[0]],
        [plain.graph.output[0]],
        [*inits, *inner.graph.initializer],
    )
    averaged = helper.make_model(graph, opset_imports=plain.opset_import, ir_version=plain.ir_version)
    onnx.checker.check_model(averaged, full_check=True)
    meta = {prop.key: prop.value for prop in plain.metadata_props}
    meta[META_SUMMARY] = json.dumps({**info.summary, "views": views})
    for key, value in meta.items():
        averaged.metadata_props.add(key=key, value=value)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(averaged, str(out))
    return read_model_info(out)
