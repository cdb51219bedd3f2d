import re
from pathlib import Path

import numpy as np
import pytest

from lcls_hitfinder.dataset import Batch, Dataset, DatasetWriter
from lcls_hitfinder.errors import UserError


def _batch(n: int, offset: int) -> Batch:
    return Batch(
        images=np.full((n, 8, 6), offset, np.float32),
        n_particles=np.arange(n, dtype=np.int8) % 5,
        structure=np.array([f"s{offset + i}" for i in range(n)], dtype=object),
        photons=np.arange(n, dtype=np.float32),
        orientations=np.zeros((n, 4, 4), np.float32),
        positions=np.arange(n * 12, dtype=np.float32).reshape(n, 4, 3) + offset,
    )


def test_round_trip_in_chunks(tmp_path: Path) -> None:
    mask = np.ones((8, 6), bool)
    mask[0, 0] = False
    out = tmp_path / "d.h5"
    with DatasetWriter(
        out,
        (8, 6),
        mask,
        {"photon_energy_ev": 6000.0, "beam_center": [4.0, 3.0], "noise": {"kind": "poisson"}},
        chunk=4,
    ) as w:
        w.append(_batch(5, 0))
        w.append(_batch(3, 100))
        assert not out.exists()  # appears only when complete
    with Dataset(out) as d:
        assert len(d) == 8 and d.shape == (8, 6)
        assert d.attrs["photon_energy_ev"] == 6000.0
        assert d.attrs["beam_center"] == [4.0, 3.0]
        assert d.attrs["noise"] == {"kind": "poisson"}
        assert d.attrs["n"] == 8
        np.testing.assert_array_equal(d.mask, mask)
        assert list(d.structure[4:6]) == ["s4", "s100"]
        assert d.images(slice(5, 8)).mean() == 100
        assert [len(b) for b in d.batches(3)] == [3, 3, 2]
        positions = d.positions
        assert positions is not None
        np.testing.assert_array_equal(positions[5:], _batch(3, 100).positions)
        np.testing.assert_array_equal(d.read(slice(0, 5)).positions, _batch(5, 0).positions)


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "d.h5"
    with pytest.raises(RuntimeError, match=r"^boom$"), DatasetWriter(out, (8, 6), np.ones((8, 6), bool), {}):
        raise RuntimeError("boom")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read dataset"):
        Dataset(tmp_path / "nope.h5")


def test_a_bank_given_as_a_dataset_is_named_a_bank(tmp_path: Path) -> None:
    """`bank build --data BANK.h5` (a file name mixed up): the file is said to be a bank, not a dataset short of
    some of its parts."""
    from lcls_hitfinder.bank import ReferenceBank

    ReferenceBank(np.eye(2, dtype=np.float32), np.array([0, 1]), "abc").save(tmp_path / "b.h5")
    with pytest.raises(UserError, match=r"b\.h5 is a reference bank, not a dataset of patterns"):
        Dataset(tmp_path / "b.h5")
    import h5py

    with h5py.File(tmp_path / "run.cxi", "w") as f:
        f["/entry_1/data_1/data"] = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(UserError, match=r"run\.cxi is a CXI file of frames, without labels: pick references"):
        Dataset(tmp_path / "run.cxi")


def test_a_dataset_of_a_newer_format_is_refused(tmp_path: Path) -> None:
    import h5py

    with DatasetWriter(tmp_path / "d.h5", (8, 6), np.ones((8, 6), bool), {}) as w:
        w.append(_batch(2, 0))
    with h5py.File(tmp_path / "d.h5", "r+") as f:
        f.attrs["format_version"] = 2
    with pytest.raises(UserError, match=r"d\.h5 is a dataset of format 2, written by a newer lcls-hitfinder"):
        Dataset(tmp_path / "d.h5")


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("run.xtc2", "an XTC2 run, not HDF5: read it through a source (xtc2:PATH?det=NAME"),
        ("notes.txt", "not an HDF5 file"),
    ],
)
def test_a_file_that_is_not_hdf5_is_said_so(tmp_path: Path, name: str, said: str) -> None:
    """h5py said "file signature not found" of an XTC2 run given as --data."""
    from lcls_hitfinder.frame_file import FrameFile

    (tmp_path / name).write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match=re.escape(f"cannot read dataset {tmp_path / name}: {said}")):
        Dataset(tmp_path / name)
    with pytest.raises(UserError, match=re.escape(f"x: cannot read {tmp_path / name} as HDF5: {said}")):
        FrameFile(tmp_path / name, "x")


@pytest.mark.parametrize(("side", "frames"), [(64, 16), (512, 4), (1024, 1), (2048, 1)])
def test_image_chunks_hold_at_most_16_frames_and_about_4_mb(tmp_path: Path, side: int, frames: int) -> None:
    """Every writer (simulate, bank pick) gets docs/dataset.md's chunks: a reader of one frame reads ~4 MB."""
    import h5py

    with DatasetWriter(tmp_path / "d.h5", (side, side), np.ones((side, side), bool), {}):
        pass
    with h5py.File(tmp_path / "d.h5") as f:
        assert f["images"].chunks == (frames, side, side)
