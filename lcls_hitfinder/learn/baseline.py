"""Evaluation of a multi-output CNN baseline run on a labelled dataset (the design study's table)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from lcls_hitfinder.dataset import Dataset
from lcls_hitfinder.errors import UserError
from lcls_hitfinder.evaluate import cnn_metrics
from lcls_hitfinder.learn.train import load_run
from lcls_hitfinder.preprocess import Preprocessor


@torch.inference_mode()
def evaluate_cnn(run_dir: Path, data: Path, batch: int = 256) -> dict[str, float | int | str]:
    """Test, count and particle accuracy of a cnn run; structures it never saw count as wrong."""
    run, settings, net = load_run(run_dir)
    if run["kind"] != "cnn":
        raise UserError(f"{run_dir} is a {run['kind']} run, not a cnn baseline")
    index = {name: i for i, name in enumerate(run["structures"])}
    structures, counts = [], []
    with Dataset(data) as d:
        pre = Preprocessor(settings.preprocess, d.mask, d.shape)
        for lo in range(0, len(d), batch):
            s, c = net(pre(d.photon_images(slice(lo, lo + batch))))  # in photons, as it was trained
            structures.append(s.argmax(1).numpy())
            counts.append(c.argmax(1).numpy())
        truth = np.array([index.get(str(x), -1) for x in d.structure])
        n = d.n_particles
    if np.any(n > 0) and not np.any(truth[n > 0] >= 0):  # the study's tables assume structures it was trained on
        print(
            f"warning: none of {data}'s structures is one the CNN was trained on: its test and particle accuracy "
            "are 0 by construction; only the count accuracy says something",
            file=sys.stderr,
        )
    metrics = cnn_metrics(np.concatenate(structures), truth, np.concatenate(counts), n)
    return {"arch": settings.cnn.arch, "n": len(n), **metrics}
