"""Structures from a spec string: PDB/mmCIF files (via gemmi), uniform bodies and generated assemblies.

A spec is either a file (`2cex.pdb`, `1abc.cif.gz`, `FILE@ASSEMBLY` for a biological assembly) or a
built-in with parameters in nm:

  sphere:R                 uniform sphere of radius R
  coreshell:RC,R[,RHO]     sphere of radius R whose core (radius RC) has RHO times the shell density
  ellipsoid:A,B,C          uniform ellipsoid with semi-axes A, B, C
  capsid:R                 icosahedral capsid of outer radius R around a less dense core (PR772-like)
  procedural:SEED[,D[,SYM]] protein-like assembly of diameter D (5-20 nm drawn from the seed) with
                           symmetry SYM (C1-C6 or D2-D4, drawn from the seed)

Atoms carry IT92 scattering-factor coefficients per element; the generated structures are made of
residue-sized beads with the form factor of an average amino-acid residue, so every structure is
described in electrons and the same physics applies to all of them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lcls_hitfinder.errors import UserError

PROTEIN_DENSITY_E_NM3 = 430.0
"""Electron density of protein (0.43 e/Å³), the density of the uniform bodies."""

RESIDUE_VOLUME_NM3 = 0.135
"""Volume per amino-acid residue in a folded protein (135 Å³): the bead density of generated structures."""

RESIDUE_COMPOSITION = {"C": 5.0, "N": 1.35, "O": 1.5, "S": 0.04}
"""Heavy atoms of an average residue; hydrogens are left out, as in most deposited structures."""


@dataclass(frozen=True)
class FormFactor:
    """f(q) = sum_i a_i exp(-b_i s²) + c with s = q / 4π in Å⁻¹ (International Tables, IT92 form)."""

    a: tuple[float, ...]
    b: tuple[float, ...]
    c: float

    def __call__(self, q_inv_nm: np.ndarray) -> np.ndarray:
        s2 = (np.asarray(q_inv_nm, np.float64) / (4 * math.pi * 10.0)) ** 2
        return sum((ai * np.exp(-bi * s2) for ai, bi in zip(self.a, self.b, strict=True)), np.full_like(s2, self.c))

    @property
    def electrons(self) -> float:
        return float(sum(self.a) + self.c)


def element_form_factor(symbol: str) -> FormFactor:
    """IT92 coefficients of an element from gemmi; an unknown symbol is a UserError."""
    import gemmi

    el = gemmi.Element(symbol)
    if el.atomic_number == 0 or not symbol.strip():
        raise UserError(f"unknown element {symbol!r}")
    if el.it92 is None:  # gemmi has IT92 coefficients up to californium (Z 98)
        raise UserError(f"no IT92 scattering factor for element {symbol!r}")
    coefs = el.it92.get_coefs()
    return FormFactor(tuple(coefs[:4]), tuple(coefs[4:8]), float(coefs[8]))


def residue_form_factor() -> FormFactor:
    """The form factor of an average residue: its atoms' Gaussians summed (a point-like bead)."""
    a: list[float] = []
    b: list[float] = []
    c = 0.0
    for symbol, count in RESIDUE_COMPOSITION.items():
        ff = element_form_factor(symbol)
        a += [count * x for x in ff.a]
        b += list(ff.b)
        c += count * ff.c
    return FormFactor(tuple(a), tuple(b), c)


@dataclass(frozen=True)
class AtomGroup:
    """Scatterers that share a form factor: positions (n, 3) in nm and weights (occupancy, counts)."""

    form_factor: FormFactor
    positions: np.ndarray
    weights: np.ndarray


@dataclass(frozen=True)
class AtomModel:
    """A structure made of point scatterers, centred on its centre of electrons."""

    name: str
    groups: tuple[AtomGroup, ...]
    key: str
    """Identifies the content (file hash or generator parameters) for the volume cache."""

    @property
    def _all(self) -> tuple[np.ndarray, np.ndarray]:
        pos = np.concatenate([g.positions for g in self.groups])
        w = np.concatenate([g.weights * g.form_factor.electrons for g in self.groups])
        return pos, w

    @property
    def radius_nm(self) -> float:
        """Largest distance of a scatterer from the centre."""
        pos, _ = self._all
        return float(np.sqrt((pos**2).sum(1)).max())

    @property
    def rg_nm(self) -> float:
        """Radius of gyration weighted by electrons."""
        pos, w = self._all
        return float(np.sqrt((w * (pos**2).sum(1)).sum() / w.sum()))

    def surface(self) -> np.ndarray:
        """(S, 3) the scatterers on the convex hull: all that a particle's extent in any direction needs."""
        from scipy.spatial import ConvexHull, QhullError

        pos, _ = self._all
        try:
            return pos[ConvexHull(pos).vertices]
        except (QhullError, ValueError):  # too few scatterers, or all in a plane
            return pos

    @property
    def electrons(self) -> float:
        return float(self._all[1].sum())


@dataclass(frozen=True)
class Body:
    """A uniform body with a closed-form Fourier transform; lengths in nm, density in electrons/nm³."""

    name: str
    kind: str
    """sphere, coreshell or ellipsoid."""
    params: tuple[float, ...]

    @property
    def rg_nm(self) -> float:
        if self.kind == "sphere":
            return math.sqrt(3 / 5) * self.params[0]
        if self.kind == "ellipsoid":
            return math.sqrt(sum(x * x for x in self.params) / 5)
        rc, r, rho = self.params
        # Rg² = ∫ρ r² / ∫ρ for a shell of density 1 plus a core of density rho - 1.
        m = r**3 + (rho - 1) * rc**3
        return math.sqrt(3 / 5 * (r**5 + (rho - 1) * rc**5) / m)

    @property
    def radius_nm(self) -> float:
        return max(self.params[:3]) if self.kind == "ellipsoid" else self.params[1 if self.kind == "coreshell" else 0]

    def extent(self, u: np.ndarray) -> np.ndarray:
        """(k,) how far the body reaches from its centre along unit directions u (k, 3), particle frame."""
        if self.kind == "ellipsoid":
            return np.sqrt(((u * np.asarray(self.params)) ** 2).sum(-1))
        return np.full(len(u), self.radius_nm)


Structure = AtomModel | Body


def _centred(groups: list[AtomGroup], spec: str) -> tuple[AtomGroup, ...]:
    pos = np.concatenate([g.positions for g in groups])
    w = np.concatenate([g.weights * g.form_factor.electrons for g in groups])
    if not len(w) or w.sum() <= 0:  # a shape too small for one residue bead, atoms of occupancy 0 only
        raise UserError(
            f"structure {spec} holds no scattering matter: too small for one residue bead, or all its atoms"
            " have occupancy 0"
        )
    centre = (pos * w[:, None]).sum(0) / w.sum()
    return tuple(AtomGroup(g.form_factor, g.positions - centre, g.weights) for g in groups)


def _numbers(spec: str, text: str, count: tuple[int, int], sizes: int | None = None) -> list[float]:
    """Parse `a,b,c` (part of `spec`, which errors name) into floats, between count[0] and count[1] of them:
    the first `sizes` (default all) positive, the others not negative."""
    try:
        values = [float(x) for x in text.split(",")] if text else []
    except ValueError:
        raise UserError(f"structure {spec}: parameters must be numbers, comma-separated, none empty") from None
    if not count[0] <= len(values) <= count[1]:
        expected = (
            f"{count[0]} to {count[1]} numbers" if count[0] < count[1] else f"{count[0]} number" + "s" * (count[0] > 1)
        )
        raise UserError(f"structure {spec}: expected {expected}, got {len(values)}")
    if any(not math.isfinite(v) for v in values):
        raise UserError(f"structure {spec}: parameters must be finite")
    if any(v <= 0 for v in values[:sizes]) or any(v < 0 for v in values[sizes or len(values) :]):
        raise UserError(f"structure {spec}: sizes must be positive" + (", densities not negative" if sizes else ""))
    return values


def load_structure(spec: str) -> Structure:
    """Parse a structure spec (see the module docstring) and build the structure."""
    name, sep, rest = spec.partition(":")
    if sep and name in _BUILTINS:
        return _BUILTINS[name](spec, rest)
    if sep and name.isalpha() and not Path(spec).exists():
        raise UserError(f"structure {spec!r}: no such file, and {name!r} is not one of {', '.join(_BUILTINS)}")
    return read_atoms(spec)


def _sphere(spec: str, rest: str) -> Body:
    return Body(spec, "sphere", tuple(_numbers(spec, rest, (1, 1))))


def _coreshell(spec: str, rest: str) -> Body:
    values = _numbers(spec, rest, (2, 3), sizes=2)
    rc, r, rho = values[0], values[1], values[2] if len(values) == 3 else 0.5
    if rc >= r:
        raise UserError(f"structure {spec}: the core radius must be smaller than the outer radius")
    return Body(spec, "coreshell", (rc, r, rho))


def _ellipsoid(spec: str, rest: str) -> Body:
    return Body(spec, "ellipsoid", tuple(_numbers(spec, rest, (3, 3))))


def read_atoms(spec: str) -> AtomModel:
    """A PDB or mmCIF file (gzipped too); `FILE@ID` builds biological assembly ID. Waters are dropped."""
    import gemmi

    path_text, _, assembly = spec.partition("@") if "@" in Path(spec).name else (spec, "", "")
    path = Path(path_text).expanduser()
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read structure {path}: {err.strerror or err}") from None
    try:
        st = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError) as err:
        raise UserError(f"cannot parse structure {path}: {str(err).splitlines()[0]}") from None
    if len(st) == 0:
        raise UserError(f"structure {path} has no models")
    model = st[0]
    if assembly:
        names = [a.name for a in st.assemblies]
        if assembly not in names:
            raise UserError(f"structure {path} has no assembly {assembly!r} (it has {names or 'none'})")
        try:
            model = gemmi.make_assembly(st.assemblies[names.index(assembly)], model, gemmi.HowToNameCopiedChain.Dup)
        except RuntimeError as err:
            raise UserError(f"structure {path}: cannot build assembly {assembly}: {err}") from None
    by_element: dict[str, tuple[list[list[float]], list[float]]] = {}
    for chain in model:
        for residue in chain:
            if residue.is_water():
                continue
            for atom in residue:
                symbol = atom.element.name
                if atom.element.atomic_number == 0:
                    raise UserError(
                        f"{path}: atom {atom.name!r} of residue {residue.name} {residue.seqid.num} "
                        f"(chain {chain.name}) has an unknown element"
                    )
                positions, weights = by_element.setdefault(symbol, ([], []))
                positions.append([atom.pos.x / 10, atom.pos.y / 10, atom.pos.z / 10])
                weights.append(atom.occ)
    if not by_element:
        raise UserError(f"structure {path} has no atoms")
    groups = [
        AtomGroup(element_form_factor(symbol), np.array(pos, np.float64), np.array(w, np.float64))
        for symbol, (pos, w) in sorted(by_element.items())
    ]
    key = hashlib.sha256(data).hexdigest()[:16] + (f"@{assembly}" if assembly else "")
    return AtomModel(spec, _centred(groups, spec), key)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _axis_rotation(axis: int, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    i, j = [k for k in range(3) if k != axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def _lattice_fill(
    inside: Callable[[np.ndarray], np.ndarray], half: float, spacing: float, rng: np.random.Generator
) -> np.ndarray:
    """Points of a jittered cubic lattice (bead density) within [-half, half]³ where inside(points) holds."""
    axis = np.arange(-half, half + spacing, spacing)
    pts = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    pts = pts + rng.uniform(-0.3, 0.3, pts.shape) * spacing
    return pts[inside(pts)]


_SYMMETRIES = ["C1", "C2", "C3", "C4", "C5", "C6", "D2", "D3", "D4"]


def symmetry_operators(symmetry: str) -> list[np.ndarray]:
    """Rotation matrices of the point group Cn (about z) or Dn (Cn plus 2-folds about x)."""
    kind, order = symmetry[0], int(symmetry[1:])
    cn = [_axis_rotation(2, 2 * math.pi * k / order) for k in range(order)]
    return cn if kind == "C" else cn + [r @ _axis_rotation(0, math.pi) for r in cn]


def procedural(seed: int, diameter_nm: float | None = None, symmetry: str | None = None) -> AtomModel:
    """A protein-like assembly drawn from `seed`: a compact subunit of random ellipsoids, repeated by Cn/Dn.

    The subunit sits off the symmetry axis so that neighbouring copies touch, as in a homo-oligomer;
    beads fill it at the residue density of a folded protein.
    """
    rng = np.random.default_rng([0x5EED, seed])
    diameter = diameter_nm if diameter_nm is not None else float(np.exp(rng.uniform(np.log(5.0), np.log(20.0))))
    symmetry = symmetry or _SYMMETRIES[int(rng.integers(len(_SYMMETRIES)))]
    ops = symmetry_operators(symmetry)
    order = int(symmetry[1:])
    r_total = diameter / 2
    # Subunit radius so that the copies fill about 60 % of the enclosing sphere.
    r_sub = r_total * (0.6 / len(ops)) ** (1 / 3)
    ring = 0.0 if order == 1 else min(0.85 * r_sub / math.sin(math.pi / order), r_total - r_sub)
    height = 0.8 * r_sub if symmetry[0] == "D" else 0.0
    centre = np.array([ring, 0.0, height])
    n_blobs = int(rng.integers(2, 6))
    blob_centres = centre + rng.normal(scale=0.35 * r_sub, size=(n_blobs, 3))
    blob_axes = r_sub * rng.uniform(0.45, 0.9, size=(n_blobs, 3))
    blob_rots = [_rotation(rng) for _ in range(n_blobs)]

    def inside(p: np.ndarray) -> np.ndarray:
        hit = np.zeros(len(p), bool)
        for c, ax, rot in zip(blob_centres, blob_axes, blob_rots, strict=True):
            local = (p - c) @ rot
            hit |= ((local / ax) ** 2).sum(1) <= 1
        return hit

    half = float(np.abs(blob_centres).max() + blob_axes.max())
    sub = _lattice_fill(inside, half, RESIDUE_VOLUME_NM3 ** (1 / 3), rng)
    beads = np.concatenate([sub @ op.T for op in ops])
    group = AtomGroup(residue_form_factor(), beads, np.ones(len(beads)))
    key = f"procedural-v1:{seed}:{diameter:.6g}:{symmetry}"
    name = f"procedural:{seed},{diameter:.3g},{symmetry}"
    return AtomModel(name, _centred([group], name), key)


def _procedural(spec: str, rest: str) -> AtomModel:
    parts = rest.split(",")
    try:
        seed = int(parts[0])
    except ValueError:
        raise UserError(f"structure {spec}: the seed must be an integer") from None
    if seed < 0:
        raise UserError(f"structure {spec}: the seed must be >= 0")
    diameter = _numbers(spec, parts[1], (1, 1))[0] if len(parts) > 1 else None
    symmetry = parts[2].upper() if len(parts) > 2 else None
    if symmetry is not None and symmetry not in _SYMMETRIES:
        raise UserError(f"structure {spec}: symmetry must be one of {', '.join(_SYMMETRIES)}")
    if len(parts) > 3:
        raise UserError(f"structure {spec}: expected procedural:SEED[,DIAMETER_NM[,SYMMETRY]]")
    model = procedural(seed, diameter, symmetry)
    return AtomModel(spec, model.groups, model.key)


def _icosahedron_normals() -> np.ndarray:
    """Unit normals of the 20 faces of an icosahedron with vertices (0, ±1, ±φ) and cyclic permutations."""
    phi = (1 + math.sqrt(5)) / 2
    v = np.array([[0, s1, s2 * phi] for s1 in (-1, 1) for s2 in (-1, 1)], float)
    verts = np.concatenate([v, v[:, [1, 2, 0]], v[:, [2, 0, 1]]])
    faces = [
        (i, j, k)
        for i in range(12)
        for j in range(i + 1, 12)
        for k in range(j + 1, 12)
        if np.isclose(np.linalg.norm(verts[i] - verts[j]), 2)
        and np.isclose(np.linalg.norm(verts[j] - verts[k]), 2)
        and np.isclose(np.linalg.norm(verts[i] - verts[k]), 2)
    ]
    normals = np.array([verts[list(f)].mean(0) for f in faces])
    return normals / np.linalg.norm(normals, axis=1, keepdims=True)


def _capsid(spec: str, rest: str) -> AtomModel:
    """An icosahedral protein shell (thickness R/10) around a core of 0.8 x protein density (genome, membrane).

    Beads sit at residue density (one per 0.135 nm³) up to R ≈ 36 nm (PR772-like: 8 x 10⁵ beads); beyond, the
    spacing is R/70 to bound their number, and the bead weight w keeps the mean density right. Heavier beads
    raise the granular high-q floor w-fold (R/35 had put 3.6x too much intensity at q = 2 nm⁻¹ for R = 35, and
    Bragg peaks of the bead lattice on the detector above R ≈ 74 nm: found by a review).
    """
    r = _numbers(spec, rest, (1, 1))[0]
    normals = _icosahedron_normals()
    inradius = r * 0.7947  # icosahedron inradius over circumradius
    shell = 0.1 * r
    spacing = max(RESIDUE_VOLUME_NM3 ** (1 / 3), r / 70)
    rng = np.random.default_rng([0xCA95, 0])
    pts = _lattice_fill(lambda p: (p @ normals.T).max(1) <= inradius, r, spacing, rng)
    depth = inradius - (pts @ normals.T).max(1)
    per_bead = spacing**3 / RESIDUE_VOLUME_NM3
    weights = np.where(depth <= shell, per_bead, 0.8 * per_bead)
    group = AtomGroup(residue_form_factor(), pts, weights)
    return AtomModel(spec, _centred([group], spec), f"capsid-v2:{r:.6g}")


_BUILTINS: dict[str, Callable[[str, str], Structure]] = {
    "sphere": _sphere,
    "coreshell": _coreshell,
    "ellipsoid": _ellipsoid,
    "capsid": _capsid,
    "procedural": _procedural,
}
