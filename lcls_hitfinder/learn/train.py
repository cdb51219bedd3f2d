"""Training of the twin embedder (triplet loss, online mining) and of the multi-output CNN baselines.

A run directory holds run.json (kind, settings, data, per-epoch history), checkpoint.safetensors (the
latest weights and optimiser moments: what `--resume` continues from) and model.safetensors (the
weights of the best validation epoch: what `export` ships). Every batch is drawn, augmented and
preprocessed on the fly from a generator seeded by (seed, epoch), so a resumed run continues exactly
as an uninterrupted one would. The checkpoint carries its own copy of the run record and the best weights
their epoch, so a run stopped between writing one file and the next resumes and exports consistently.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from lcls_hitfinder import strict_json
from lcls_hitfinder.bank import ReferenceBank, select_references
from lcls_hitfinder.dataset import Dataset, digest, shared_count, shared_said
from lcls_hitfinder.devices import resolve_device
from lcls_hitfinder.errors import UserError
from lcls_hitfinder.evaluate import cnn_metrics, hit_metrics
from lcls_hitfinder.labels import MAX_PARTICLES, labels_of_counts
from lcls_hitfinder.learn.augment import Augmenter
from lcls_hitfinder.learn.nets import TwinEmbedder, build_cnn
from lcls_hitfinder.learn.settings import TrainSettings
from lcls_hitfinder.learn.triplet import triplet_loss
from lcls_hitfinder.paths import replaced
from lcls_hitfinder.preprocess import Preprocessor

Kind = Literal["twin", "cnn"]
RUN_FILE = "run.json"
CHECKPOINT = "checkpoint.safetensors"
BEST = "model.safetensors"
console = Console(stderr=True)


@dataclass
class Patterns:
    """A dataset in memory: photon images plus labels and what augmentation needs to know."""

    path: Path
    images: torch.Tensor  # (N, H, W) float32 photons
    n_particles: np.ndarray
    structure: np.ndarray
    mask: np.ndarray
    beam_center: tuple[float, float] | None

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def single_photons(self) -> float:
        """Mean photons of a single hit (from the images, so it matches what augmentation scales)."""
        single = np.nonzero(self.n_particles == 1)[0]
        if len(single) == 0:
            raise UserError(f"{self.path} has no single hits to learn from")
        return float(self.images[torch.from_numpy(single[:2000])].sum(dim=(1, 2)).mean())


def load_patterns(path: Path) -> Patterns:
    with Dataset(path) as data:
        if len(data) == 0:
            raise UserError(f"{path} holds no patterns")
        n = data.n_particles
        if n.min() < 0 or n.max() > MAX_PARTICLES:
            raise UserError(f"{path}: n_particles must be 0..{MAX_PARTICLES}")
        bc = data.attrs.get("beam_center")
        images = torch.from_numpy(data.photon_images())  # augmentation works in photons
        return Patterns(
            path=Path(path),
            images=images,
            n_particles=n,
            structure=data.structure,
            mask=data.mask,
            beam_center=(float(bc[0]), float(bc[1])) if isinstance(bc, list | tuple) and len(bc) == 2 else None,
        )


def class_labels(n_particles: np.ndarray, structure: np.ndarray, settings: TrainSettings) -> np.ndarray:
    """Integer classes the triplet loss separates: counts (or blank/single/multi), optionally x structure."""
    base = np.asarray(n_particles) if settings.classes == "count" else labels_of_counts(n_particles)
    if not settings.per_structure:
        return base.astype(np.int64)
    keyed = np.char.add(base.astype(str), np.where(base > 0, np.asarray(structure, dtype=str), ""))
    return np.unique(keyed, return_inverse=True)[1].astype(np.int64)


class BalancedSampler:
    """P classes x K members per batch, drawn with replacement: every anchor has positives and negatives.

    With `groups` (the structure of each pattern, classes split by structure), whole groups are drawn:
    all classes of a structure enter a batch together, so it holds the hard negatives for a single hit,
    the multi-hits of the same structure.
    """

    def __init__(self, labels: np.ndarray, groups: np.ndarray | None = None, k: int = 4) -> None:
        order = np.argsort(labels, kind="stable")
        classes, starts = np.unique(labels[order], return_index=True)
        self.members = dict(zip(classes.tolist(), np.split(order, starts[1:]), strict=True))
        self.k = k
        self.groups: list[np.ndarray] = (
            [np.unique(labels[groups == g]) for g in np.unique(groups)] if groups is not None else [classes]
        )

    def __call__(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """About `size` patterns: with fewer classes than size / K (few structures), more members each."""
        if len(self.groups) == 1:  # one group: draw classes, at least two (one alone gives no negatives)
            classes = self.groups[0]
            n = len(classes) if len(classes) * self.k <= size else min(len(classes), max(2, size // self.k))
            k = max(2, size // n)
            picked = rng.choice(classes, size=n, replace=False)
        else:
            per_group = self.k * np.mean([len(g) for g in self.groups])
            chosen = rng.choice(
                len(self.groups), size=min(len(self.groups), max(2, round(size / per_group))), replace=False
            )
            picked = np.concatenate([self.groups[i] for i in chosen])
            k = max(self.k, size // len(picked))
        return np.concatenate([rng.choice(self.members[int(c)], size=k) for c in picked])


def build_net(kind: Kind, settings: TrainSettings, n_structures: int) -> nn.Module:
    if kind == "twin":
        return TwinEmbedder(
            settings.embed_dim,
            settings.width,
            settings.depth,
            settings.unshuffle,
            settings.radial_rings,
            settings.preprocess.thumbnail,
            settings.convs,
        )
    return build_cnn(settings.cnn.arch, settings.cnn.width, max(n_structures, 1))


def _flatten_optimizer(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = opt.state_dict()["state"]
    return {f"optim.{i}.{k}": torch.as_tensor(v) for i, st in state.items() for k, v in st.items()}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    sd["state"] = state
    opt.load_state_dict(sd)


def save_weights(
    net: nn.Module, path: Path, extra: dict[str, torch.Tensor] | None = None, metadata: dict[str, str] | None = None
) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    # written as bytes: safetensors' save_file makes the file owner-only, and a shared run directory's
    # weights must be as readable as its run.json (the umask decides)
    _replace_whole(path, save({**tensors, **(extra or {})}, metadata=metadata))


def _metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (OSError, SafetensorError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


def _replace_whole(path: Path, data: bytes) -> None:
    with replaced(path) as tmp:
        tmp.write_bytes(data)


def write_run(run_dir: Path, run: dict[str, Any]) -> None:
    """The run's record, replaced whole, as the weights are."""
    _replace_whole(run_dir / RUN_FILE, (strict_json.dumps(run, indent=2) + "\n").encode())


def read_run(run_dir: Path) -> dict[str, Any]:
    """The record saved with the latest weights. run.json is its copy for reading (a run stopped between
    writing the two is an epoch behind there, and resuming from it would train that epoch twice), read when
    the checkpoint carries none (an older version's) or was deleted from a finished run."""
    record = _metadata(run_dir / CHECKPOINT).get(RUN_FILE) if (run_dir / CHECKPOINT).exists() else None
    try:
        run: dict[str, Any] = json.loads(record or (run_dir / RUN_FILE).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the run record {run_dir / RUN_FILE}: {err}") from None
    return run


def load_weights(net: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Load the model part of a safetensors file into `net`; return all its tensors."""
    tensors = load_file(str(path))
    net.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    return tensors


class Trainer:
    """One training run (twin or cnn) in `out`: fresh, or resumed from its checkpoint."""

    def __init__(
        self,
        kind: Kind,
        data: Path | None,
        val: Path | None,
        out: Path,
        settings: TrainSettings,
        resume: bool = False,
        epochs: int | None = None,
        machine: dict[str, Any] | None = None,
    ) -> None:
        """`resume` continues the run in `out` with its saved data and settings; `epochs` there extends it, and
        `machine` ({"device": ..., "threads": ...}) says where it runs now (a CUDA run resumed on a CPU)."""
        self.out = out
        if resume:
            if not (out / CHECKPOINT).exists():
                raise UserError(f"nothing to resume in {out} (no {CHECKPOINT})")
            run = read_run(out)
            if run["kind"] != kind:
                raise UserError(f"{out} holds a {run['kind']} run, not a {kind} one")
            data, val = Path(run["data"]), Path(run["val"])
            run["settings"].update(machine or {})
            settings = TrainSettings.model_validate(run["settings"])
            done = len(run["history"])
            if epochs is not None:
                settings.epochs = epochs
                run["settings"]["epochs"] = epochs
            if settings.epochs <= done:
                raise UserError(f"{out} has trained {done} epochs already: --epochs N with N > {done} extends it")
        elif any((out / name).exists() for name in (CHECKPOINT, BEST, RUN_FILE)):
            raise UserError(f"{out} already holds a run: pass --resume to continue it, or choose a new --out")
        if data is None or val is None:
            raise UserError("training needs --data and --val")
        self.kind, self.settings = kind, settings
        torch.set_num_threads(settings.threads)
        torch.manual_seed(settings.seed)
        self.device = resolve_device(settings.device, "train.device")
        if resume:
            for path in (data, val):
                if not path.is_file():
                    raise UserError(f"the run in {out} was trained on {path}, which is not there: put it back")
        self.train_set = load_patterns(data)
        self.val_set = load_patterns(val)
        train_images, val_images = self.train_set.images.numpy(), self.val_set.images.numpy()  # views, on the CPU
        digests = {"data_digest": digest(train_images), "val_digest": digest(val_images)}
        if not resume:  # files held apart by name may share patterns (the same simulation seed twice)
            shared = shared_count(train_images, val_images)
            if shared:
                print(shared_said(shared, data, val, "validation would judge patterns trained on"), file=sys.stderr)
        if resume:
            for key, path in (("data_digest", data), ("val_digest", val)):
                if run.get(key, digests[key]) != digests[key]:  # runs from before digests were kept: unchecked
                    raise UserError(f"{path} is not the file the run in {out} was trained on: its patterns changed")
        # the validation bank's references, drawn once (seeded): every epoch is judged on the same split
        v = self.val_set
        self.val_refs = select_references(
            v.n_particles, v.structure if settings.per_structure else None, settings.bank_per_class, settings.seed
        )
        # before an epoch is spent, not after: the validation bank weighs singles against blanks or multi-hits,
        # and needs singles beside it to judge
        if kind == "twin" and not (v.n_particles == 1).any():
            raise UserError(f"{val} holds no single hits: validation judges how singles are told apart")
        if kind == "twin" and (v.n_particles[self.val_refs] == 1).all():
            raise UserError(f"{val} holds single hits only: validation needs blanks or multi-hits beside them")
        if kind == "twin" and not np.delete(v.n_particles == 1, self.val_refs).any():
            raise UserError(
                f"{val} has no single hits beside the {settings.bank_per_class} per class its validation bank "
                "draws: give it more singles, or a smaller bank_per_class"
            )
        self.structures = sorted(
            {str(s) for s, n in zip(self.train_set.structure, self.train_set.n_particles, strict=True) if n > 0}
        )
        self.net = build_net(kind, settings, len(self.structures)).to(self.device)
        # the auxiliary head trains beside the embedder and is never exported
        self.aux = nn.Linear(settings.embed_dim, 3).to(self.device) if kind == "twin" and settings.aux_weight else None
        params = [*self.net.parameters(), *(self.aux.parameters() if self.aux else [])]
        self.opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.labels = class_labels(self.train_set.n_particles, self.train_set.structure, settings)
        if len(np.unique(labels_of_counts(self.train_set.n_particles))) < 2:  # nothing to tell singles from
            raise UserError(
                f"{data} holds one kind of pattern only: training needs blanks or multi-hits beside singles"
            )
        index = {name: i for i, name in enumerate(self.structures)}
        self.groups = np.array(
            [
                index[str(v)] if n > 0 else -1
                for v, n in zip(self.train_set.structure, self.train_set.n_particles, strict=True)
            ]
        )
        groups = np.asarray(self.train_set.structure, dtype=str) if settings.per_structure else None
        self.sampler = BalancedSampler(self.labels, groups)
        self.run: dict[str, Any] = {
            "kind": kind,
            "data": str(Path(data).resolve()),
            "val": str(Path(val).resolve()),
            "settings": settings.model_dump(mode="json"),
            "structures": self.structures,
            "frame_shape": list(self.train_set.shape),
            **digests,
            "history": [],
            "best": None,
        }
        self.start_epoch = 0
        if resume:
            tensors = load_weights(self.net, out / CHECKPOINT)
            if self.aux is not None:
                self.aux.load_state_dict(
                    {k.removeprefix("aux."): v for k, v in tensors.items() if k.startswith("aux.")}
                )
            _restore_optimizer(self.opt, tensors)
            if best_weights(out, run) == out / CHECKPOINT:  # stopped before the best weights were copied out
                save_weights(self.net, out / BEST, metadata={"epoch": str(run["best"]["epoch"])})
            self.run = run
            self.start_epoch = len(self.run["history"])
        out.mkdir(parents=True, exist_ok=True)
        self.pre = Preprocessor(settings.preprocess, self.train_set.mask, self.train_set.shape, device=self.device)
        self.augment = Augmenter(
            settings.augment, self.train_set.shape, self.train_set.single_photons(), self.train_set.beam_center
        )
        val_pre = Preprocessor(settings.preprocess, self.val_set.mask, self.val_set.shape, device=self.device)
        self.val_thumbs = torch.cat(
            [val_pre(self.val_set.images[i : i + 512]) for i in range(0, len(self.val_set.images), 512)]
        )
        n_train = len(self.train_set.images)
        self.steps = settings.steps_per_epoch or max(1, n_train // settings.batch_size)
        if settings.batch_size > n_train:  # drawn with replacement: it trains, on copies
            print(
                f"warning: batches of {settings.batch_size} from {n_train} training patterns repeat patterns "
                "in every batch",
                file=sys.stderr,
            )

    def _lr(self, step: int) -> float:
        """Cosine decay over the whole run, from the global step (so resuming needs no scheduler state)."""
        if self.settings.lr_schedule == "constant":
            return self.settings.lr
        total = self.settings.epochs * self.steps
        return self.settings.lr * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    def _batch(self, rng: np.random.Generator, gen: torch.Generator) -> tuple[torch.Tensor, np.ndarray]:
        idx = self.sampler(self.settings.batch_size, rng)
        images = self.train_set.images[torch.from_numpy(idx)].to(self.device)
        hits = torch.from_numpy(self.train_set.n_particles[idx] > 0)
        x = self.pre.thumbnails(self.pre.photons(self.augment(images, gen, hits)))
        return x, idx

    def _loss(self, x: torch.Tensor, idx: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.settings
        if self.kind == "twin":
            labels = torch.from_numpy(self.labels[idx]).to(self.device)
            emb = self.net(x)
            parts = []  # "both": the mean of the pooled and the own-structure losses
            if s.negatives != "own-structure":
                parts.append(triplet_loss(emb, labels, s.alpha, s.mining))
            if s.negatives != "all":
                groups = torch.from_numpy(self.groups[idx]).to(self.device)
                parts.append(triplet_loss(emb, labels, s.alpha, s.mining, groups))
            loss, stats = torch.stack([p[0] for p in parts]).mean(), parts[-1][1]
            if self.aux is not None:
                hit_class = torch.from_numpy(labels_of_counts(self.train_set.n_particles[idx])).to(self.device)
                loss = loss + s.aux_weight * F.cross_entropy(self.aux(emb), hit_class)
            return loss, stats
        structure_logits, count_logits = self.net(x)
        counts = torch.from_numpy(self.train_set.n_particles[idx]).to(self.device)
        index = {name: i for i, name in enumerate(self.structures)}
        struct = torch.tensor([index.get(str(v), -100) for v in self.train_set.structure[idx]], device=self.device)
        struct = torch.where(counts > 0, struct, torch.full_like(struct, -100))  # blanks have no structure
        loss = F.cross_entropy(count_logits, counts)
        if (struct >= 0).any():
            loss = loss + F.cross_entropy(structure_logits, struct, ignore_index=-100)
        return loss, {}

    @torch.no_grad()
    def _outputs(self, thumbs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.net.eval()
        chunks = [self.net(thumbs[i : i + 512]) for i in range(0, len(thumbs), 512)]
        self.net.train()
        if isinstance(chunks[0], tuple):
            return tuple(torch.cat(parts).cpu() for parts in zip(*chunks, strict=True))
        return (torch.cat(chunks).cpu(),)

    def validate(self) -> dict[str, Any]:
        """Twin: a bank of `bank_per_class` references per count (and structure, with per_structure) drawn
        from the validation set, the rest classified (threshold 0). CNN: the study's table metrics on all of it."""
        v, s = self.val_set, self.settings
        if self.kind == "twin":
            (emb,) = self._outputs(self.val_thumbs)
            e = emb.numpy()
            refs = self.val_refs
            rest = np.setdiff1d(np.arange(len(e)), refs)
            bank = ReferenceBank(e[refs], v.n_particles[refs], model_hash="validation")
            labels = torch.from_numpy(class_labels(v.n_particles, v.structure, s))
            val_loss = float(triplet_loss(emb[:1024], labels[:1024], s.alpha, "batch-hard")[0])
            m = hit_metrics(v.n_particles[rest], bank.decide(e[rest]))
            m.pop("confusion")
            m["val_loss"] = val_loss
            m["selection"] = 0.5 * (m["accuracy"] + m["precision_at_recall_0.9"])
            return m
        structure_logits, count_logits = self._outputs(self.val_thumbs)
        index = {name: i for i, name in enumerate(self.structures)}
        truth = np.array([index.get(str(x), -1) for x in v.structure])
        m = dict(cnn_metrics(structure_logits.argmax(1).numpy(), truth, count_logits.argmax(1).numpy(), v.n_particles))
        m["selection"] = m["test_accuracy"]
        return m

    def fit(self) -> dict[str, Any]:
        s = self.settings
        self.net.train()
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console,
        )
        with progress:
            for epoch in range(self.start_epoch, s.epochs):
                rng = np.random.default_rng([s.seed, epoch])
                gen = torch.Generator(self.device).manual_seed(s.seed * 100_003 + epoch)
                task = progress.add_task(f"{self.kind} epoch {epoch + 1}/{s.epochs}", total=self.steps, info="")
                t0, losses = time.perf_counter(), []
                for step in range(self.steps):
                    for group in self.opt.param_groups:
                        group["lr"] = self._lr(epoch * self.steps + step)
                    x, idx = self._batch(rng, gen)
                    loss, stats = self._loss(x, idx)
                    self.opt.zero_grad(set_to_none=True)
                    loss.backward()
                    self.opt.step()
                    losses.append(loss.item())
                    info = f"loss {np.mean(losses[-20:]):.4f}" + (f" active {stats['active']:.2f}" if stats else "")
                    progress.update(task, advance=1, info=info)
                    if not console.is_terminal and (step + 1) % max(1, self.steps // 5) == 0:
                        console.print(f"epoch {epoch + 1} step {step + 1}/{self.steps}: {info}")  # logs under nohup
                metrics = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), **self.validate()}
                metrics["seconds"] = round(time.perf_counter() - t0, 1)
                self.run["history"].append(metrics)
                best = self.run["best"]
                if best is None or metrics["selection"] >= best["selection"]:
                    self.run["best"] = metrics
                aux = {f"aux.{k}": v.detach().cpu() for k, v in self.aux.state_dict().items()} if self.aux else {}
                record = {RUN_FILE: strict_json.dumps(self.run)}
                save_weights(self.net, self.out / CHECKPOINT, {**_flatten_optimizer(self.opt), **aux}, record)
                if self.run["best"] is metrics:  # after the checkpoint, which holds these weights until then
                    save_weights(self.net, self.out / BEST, metadata={"epoch": str(epoch + 1)})
                write_run(self.out, self.run)
                shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
                progress.console.print(f"epoch {epoch + 1}: {shown}")
        return dict(self.run["best"] or {})


def load_run(run_dir: Path) -> tuple[dict[str, Any], TrainSettings, nn.Module]:
    """A finished run's record, settings and best network (on the CPU, in eval mode)."""
    if not (Path(run_dir) / RUN_FILE).exists():
        raise UserError(f"{run_dir} is not a training run directory (no {RUN_FILE})")
    run = read_run(Path(run_dir))
    settings = TrainSettings.model_validate(run["settings"])
    net = build_net(run["kind"], settings, len(run["structures"]))
    load_weights(net, best_weights(Path(run_dir), run))
    return run, settings, net.eval()


def best_weights(run_dir: Path, run: dict[str, Any]) -> Path:
    """The file holding the best epoch's weights: model.safetensors, or the checkpoint when the best epoch is
    the last one saved and the run stopped before copying it out (the checkpoint is written first)."""
    best = str(run["best"]["epoch"])
    if (run_dir / BEST).exists() and _metadata(run_dir / BEST).get("epoch", best) == best:  # none: older version
        return run_dir / BEST
    if best == str(len(run["history"])) and (run_dir / CHECKPOINT).exists():
        return run_dir / CHECKPOINT
    raise UserError(f"{run_dir / BEST} does not hold the weights of epoch {best}, the run's best")
