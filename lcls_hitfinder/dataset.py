"""The HDF5 dataset format that every subcommand reads and the simulator writes, defined once.

Layout (documented in docs/dataset.md):
  /images        float32 (N, H, W)  photons (images.attrs["units"]; "adu" when written in ADU)
  /n_particles   int8    (N,)       0 for blanks
  /structure     str     (N,)       structure id of each pattern (UTF-8)
  /photons       float32 (N,)       photons in the pattern before noise
  /mask          bool    (H, W)     True for good pixels
  /orientations  float32 (N, 4, 4)  one quaternion per particle, zero-padded
  /positions     float32 (N, 4, 3)  particle centres in nm (lab frame, z along the beam), zero-padded
  attrs          geometry, beam, noise, seed, simulator version (see DatasetWriter)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from lcls_hitfinder.errors import UserError
from lcls_hitfinder.labels import MAX_PARTICLES
from lcls_hitfinder.simulate.geometry import HC_EV_NM

if TYPE_CHECKING:
    from lcls_hitfinder.preprocess import PhotonCalibration

FORMAT = "lcls-hitfinder-dataset"
FORMAT_VERSION = 1
_STR = h5py.string_dtype("utf-8")


# What sets a pattern's scale in q (its speckles' size in pixels): references of another geometry are other
# patterns to the bank, however like the sample (a review: 0.15 m references judging 0.3 m data kept 4% of
# the singles at precision 0.09, unsaid)
GEOMETRY = ("distance_m", "photon_energy_ev", "pixel_size_m")
_Q_TOLERANCE = 0.05


def taken(attrs: Mapping[str, Any], shape: tuple[int, ...]) -> dict[str, Any]:
    """How a file's patterns were taken: the shape of a frame as read (a panel stack's, before it was stored
    tiled: `bank pick` records it) and, where the file records it, the geometry."""
    read = attrs.get("frame_shape")
    described: dict[str, Any] = {"frame_shape": [int(s) for s in (read if read is not None else shape)]}
    described.update({k: float(attrs[k]) for k in GEOMETRY if k in attrs})
    if "beam_center" in attrs and attrs["beam_center"] is not None:
        described["beam_center"] = [float(c) for c in np.ravel(attrs["beam_center"])]
    return described


def _q_edges(t: Mapping[str, Any]) -> np.ndarray | None:
    """q (nm^-1) at the farthest edge of the frame from the beam along its rows and along its columns, or None
    without the whole geometry: what the thumbnail spans (the beam in the middle where no centre is recorded)."""
    if not all(k in t for k in GEOMETRY):
        return None
    n = np.asarray(t["frame_shape"][-2:], float)
    centre = np.asarray(t.get("beam_center", (n - 1) / 2), float)
    reach = np.maximum(centre + 0.5, n - 0.5 - centre) * t["pixel_size_m"]  # to the far edge of the last pixel
    return 4 * np.pi * t["photon_energy_ev"] / HC_EV_NM * np.sin(np.arctan(reach / t["distance_m"]) / 2)


def taken_otherwise(references: Mapping[str, Any] | None, patterns: Mapping[str, Any]) -> str | None:
    """What differs between how a bank's references and these patterns were taken, in words (None: nothing
    known differs). Where both record their geometry, the q the frames span (to 5%): frames of other sizes that
    span the same q bin to the same thumbnail. References read from a detector (picked: no geometry) against
    frames of another shape (picked as a panel stack, served as psana's image). Simulated references against
    frames whose geometry is unknown (a live source's): nothing can be said."""
    if references is None:
        return None
    ref_q, pat_q = _q_edges(references), _q_edges(patterns)
    if ref_q is not None and pat_q is None:
        return None
    if ref_q is not None and pat_q is not None:
        if np.all(np.abs(pat_q - ref_q) <= _Q_TOLERANCE * ref_q):
            return None
        geometry = "; ".join(f"{k} {references[k]:g}, these {patterns[k]:g}" for k in GEOMETRY)
        if references.get("beam_center") != patterns.get("beam_center"):
            geometry += f"; beam_center {references.get('beam_center')}, these {patterns.get('beam_center')}"
        why = f"q at the frames' edges {ref_q.round(2).tolist()} nm^-1, these {pat_q.round(2).tolist()}: {geometry}"
    elif references.get("frame_shape") != patterns.get("frame_shape"):
        why = f"frames of {tuple(references['frame_shape'])}, these of {tuple(patterns['frame_shape'])}"
    else:
        return None
    return (
        f"the bank's references were taken otherwise ({why}): its decisions on these patterns are not what it was "
        "calibrated for; build the bank from references taken as these are"
    )


def _encode_attr(value: Any) -> Any:
    """HDF5 attributes hold scalars and arrays; anything nested is stored as JSON."""
    if isinstance(value, dict | list | tuple) and not (
        isinstance(value, list | tuple) and all(isinstance(v, int | float) for v in value)
    ):
        return json.dumps(value)
    return "" if value is None else value


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class Batch:
    """A slice of a dataset in memory."""

    images: np.ndarray
    n_particles: np.ndarray
    structure: np.ndarray
    photons: np.ndarray
    orientations: np.ndarray
    positions: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])


class DatasetWriter:
    """Appends batches to a new dataset file, chunked and compressed, so N can exceed memory."""

    def __init__(
        self,
        path: Path | str,
        shape: tuple[int, int],
        mask: np.ndarray,
        attrs: Mapping[str, Any],
        chunk: int | None = None,
        compression: str = "gzip",
        units: str = "photons",
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        h, w = shape
        # HDF5 chunks of up to 16 frames and at most ~4 MB (docs/dataset.md): one frame at 1024²
        chunk = chunk or max(1, min(16, (4 << 20) // (4 * h * w)))
        if mask.shape != (h, w):
            raise ValueError(f"mask shape {mask.shape} != image shape {(h, w)}")
        self._tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        self._f = h5py.File(self._tmp, "w")
        opts: dict[str, Any] = {"compression": compression}
        if compression == "gzip":
            opts["compression_opts"] = 1
        f = self._f
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        for key, value in attrs.items():
            f.attrs[key] = _encode_attr(value)
        f.create_dataset(
            "images", (0, h, w), np.float32, maxshape=(None, h, w), chunks=(chunk, h, w), shuffle=True, **opts
        )
        f.create_dataset("n_particles", (0,), np.int8, maxshape=(None,), chunks=(4096,))
        f.create_dataset("structure", (0,), _STR, maxshape=(None,), chunks=(4096,))
        f.create_dataset("photons", (0,), np.float32, maxshape=(None,), chunks=(4096,))
        f.create_dataset(
            "orientations",
            (0, MAX_PARTICLES, 4),
            np.float32,
            maxshape=(None, MAX_PARTICLES, 4),
            chunks=(4096, 4, 4),
        )
        f.create_dataset(
            "positions", (0, MAX_PARTICLES, 3), np.float32, maxshape=(None, MAX_PARTICLES, 3), chunks=(4096, 4, 3)
        )
        f.create_dataset("mask", data=mask.astype(bool))
        f["images"].attrs["units"] = units
        f["orientations"].attrs["description"] = "unit quaternions (w, x, y, z), one per particle, zero-padded"
        f["positions"].attrs["description"] = "particle centres, nm, lab frame (z along the beam), zero-padded"
        self._n = 0

    def append(self, batch: Batch) -> None:
        n = len(batch)
        if n == 0:
            return
        lo, hi = self._n, self._n + n
        for name in ("images", "n_particles", "structure", "photons", "orientations", "positions"):
            ds = self._f[name]
            ds.resize(hi, axis=0)
            ds[lo:hi] = getattr(batch, name)
        self._n = hi

    def close(self) -> None:
        """Finish the file; it appears under its final name only once complete."""
        if self._f.id.valid:
            self._f.attrs["n"] = self._n
            self._f.close()
            self._tmp.replace(self.path)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()
            self._tmp.unlink(missing_ok=True)


def why_not_hdf5(path: Path, err: OSError) -> str:
    """h5py's words for a file it cannot open, or what the file is where it is not HDF5 at all (an XTC2 run
    given where a dataset belongs reads "file signature not found")."""
    if not path.is_file() or h5py.is_hdf5(path):
        return str(err)
    if path.suffix == ".xtc2":
        return (
            "an XTC2 run, not HDF5: read it through a source (xtc2:PATH?det=NAME; `bank pick --source` for references)"
        )
    return "not an HDF5 file"


class Dataset:
    """Read access to a dataset file: lazy slices, so a 1e5-pattern file is never loaded whole."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self._f = h5py.File(self.path, "r")
        except (OSError, FileNotFoundError) as err:
            raise UserError(f"cannot read dataset {self.path}: {why_not_hdf5(self.path, err)}") from None
        missing = {"images", "n_particles", "mask"} - set(self._f.keys())
        if missing:
            bank = "embeddings" in self._f and "model_hash" in self._f.attrs
            cxi = "entry_1" in self._f
            self._f.close()
            if bank:
                raise UserError(f"{self.path} is a reference bank, not a dataset of patterns")
            if cxi:
                raise UserError(
                    f"{self.path} is a CXI file of frames, without labels: pick references from it with "
                    f"`lcls-hitfinder bank pick --source h5:{self.path} --picks PICKS.csv --out REFS.h5`"
                )
            raise UserError(f"{self.path} is not an lcls-hitfinder dataset (missing {sorted(missing)})")
        version = int(self._f.attrs.get("format_version", FORMAT_VERSION))
        if version > FORMAT_VERSION:
            self._f.close()
            raise UserError(
                f"{self.path} is a dataset of format {version}, written by a newer lcls-hitfinder (this one reads "
                f"format {FORMAT_VERSION})"
            )
        self.attrs: dict[str, Any] = {k: _decode_attr(v) for k, v in self._f.attrs.items()}
        self.mask: np.ndarray = self._f["mask"][()].astype(bool)
        self.n_particles: np.ndarray = self._f["n_particles"][()].astype(np.int64)

    def __len__(self) -> int:
        return int(self._f["images"].shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        _, h, w = self._f["images"].shape
        return int(h), int(w)

    @property
    def taken(self) -> dict[str, Any]:
        return taken(self.attrs, self.shape)

    @property
    def structure(self) -> np.ndarray:
        if "structure" not in self._f:
            return np.full(len(self), "", dtype=object)
        return np.asarray(self._f["structure"].asstr()[()], dtype=object)

    @property
    def calibration(self) -> PhotonCalibration | None:
        """How the images turn into photons when the file holds them in ADU (written with `noise.adu_gain`), else
        None: every reader of a dataset decodes it the same way, with the gain and offset the file records."""
        from lcls_hitfinder.preprocess import PhotonCalibration  # torch stays out of the simulator's imports

        if self._f["images"].attrs.get("units", "photons") != "adu":
            return None
        noise = self.attrs.get("noise")
        noise = noise if isinstance(noise, dict) else {}
        if not noise.get("adu_gain"):
            raise UserError(f"{self.path}: its images are in ADU but it records no noise.adu_gain to convert them")
        return PhotonCalibration(gain=float(noise["adu_gain"]), offset=float(noise.get("adu_offset") or 0.0))

    @property
    def photons(self) -> np.ndarray:
        return np.asarray(self._f["photons"][()], dtype=np.float32)

    @property
    def positions(self) -> np.ndarray | None:
        """(N, 4, 3) particle centres in nm, or None for files written before they were recorded."""
        return np.asarray(self._f["positions"][()], dtype=np.float32) if "positions" in self._f else None

    def images(self, sel: slice | np.ndarray | None = None) -> np.ndarray:
        """Images of a slice or of sorted indices (h5py needs increasing indices)."""
        ds = self._f["images"]
        return np.asarray(ds[()] if sel is None else ds[sel], dtype=np.float32)

    def photon_images(self, sel: slice | np.ndarray | None = None) -> np.ndarray:
        """`images(sel)` in photons: a file in ADU decoded with its recorded calibration by the service's own
        conversion (`Preprocessor.photons`), in place; a file in photons as it is."""
        images = self.images(sel)
        calibration = self.calibration
        if calibration is None:
            return images
        import torch

        from lcls_hitfinder.preprocess import Preprocessor, PreprocessSettings

        Preprocessor(PreprocessSettings(), None, self.shape, calibration).photons(
            torch.from_numpy(images), inplace=True
        )
        return images

    def read(self, sel: slice) -> Batch:
        f = self._f
        n = len(range(*sel.indices(len(self))))
        return Batch(
            images=self.images(sel),
            n_particles=self.n_particles[sel],
            structure=np.asarray(f["structure"].asstr()[sel], dtype=object)  # those rows only, not the column
            if "structure" in f
            else np.full(n, "", dtype=object),
            photons=np.asarray(f["photons"][sel]) if "photons" in f else np.zeros(n, np.float32),
            orientations=np.asarray(f["orientations"][sel])
            if "orientations" in f
            else np.zeros((n, MAX_PARTICLES, 4), np.float32),
            positions=np.asarray(f["positions"][sel])
            if "positions" in f
            else np.zeros((n, MAX_PARTICLES, 3), np.float32),
        )

    def batches(self, size: int) -> Iterator[Batch]:
        for lo in range(0, len(self), size):
            yield self.read(slice(lo, min(lo + size, len(self))))

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> Dataset:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def digest(images: np.ndarray) -> str:
    """A fingerprint of a file's patterns, all of them: a resumed run checks that its data are the ones it
    started on."""
    return hashlib.blake2b(np.ascontiguousarray(images).data, digest_size=16).hexdigest()


def _pattern_digests(images: Iterable[np.ndarray]) -> Iterator[bytes]:
    """A digest per pattern, constant frames left out: the blanks of a noise-free simulation are all alike in
    every file, whatever its seed."""
    for image in images:
        if image.size and image.min() != image.max():
            yield hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16).digest()


def shared_count(first: Iterable[np.ndarray], second: Iterable[np.ndarray]) -> int:
    """How many patterns of `second` are also in `first`, pixel for pixel."""
    seen = set(_pattern_digests(first))
    return sum(d in seen for d in _pattern_digests(second))


def _file_patterns(path: Path, rows: np.ndarray | None = None, chunk: int = 512) -> Iterator[np.ndarray]:
    """A file's patterns (or those of `rows`), read chunk by chunk."""
    with Dataset(path) as d:
        if rows is None:
            for lo in range(0, len(d), chunk):
                yield from d.images(slice(lo, lo + chunk))
            return
        rows = np.sort(rows)
        for lo in range(0, len(rows), chunk):
            yield from d.images(rows[lo : lo + chunk])


def shared_patterns(first: Path, second: Path) -> int:
    """`shared_count` of two files: two simulated with the same seed and settings share their first patterns
    (`simulate` draws chunk by chunk from its seed), so data held out by file name alone may not be."""
    return shared_count(_file_patterns(first), _file_patterns(second))


def pattern_digests(path: Path, rows: np.ndarray | None = None) -> np.ndarray:
    """(K, 16) uint8: the digests of a file's patterns (or of `rows`), constant ones left out, for a bank to
    remember what it was built from."""
    return np.frombuffer(b"".join(_pattern_digests(_file_patterns(path, rows))), np.uint8).reshape(-1, 16).copy()


def seen_count(seen: np.ndarray, path: Path) -> int:
    """How many patterns of the file at `path` have one of the digests `seen` (`pattern_digests`)."""
    known = {bytes(row) for row in seen}
    return sum(d in known for d in _pattern_digests(_file_patterns(path)))


def shared_said(n: int, first: Path, second: Path, what: str) -> str:
    return (
        f"warning: {n} patterns of {second} are also in {first}, pixel for pixel ({what}): simulated with the same "
        "--seed? Give each file its own"
    )
