"""Toy NanoAOD: small, seeded, physically motivated files for demos and tests.

The files look like CMSSW NanoAOD to every reader (uproot, coffea's
``NanoAODSchema``, ROOT): a TTree ``Events`` with one counter per collection
(``nJet``, ``nMuon``, ``nElectron``) and one branch per field (``Jet_pt``, ...),
the event id (``run``, ``luminosityBlock``, ``event``), ``genWeight`` and the
``MET_*`` branches, plus a ``Runs`` tree with ``genEventCount`` and
``genEventSumw``. Three processes are simulated with vectorised numpy:

``ttbar`` (signal)
    top-pair production, mostly lepton+jets (two b jets, two jets from the
    hadronic W, one muon or electron and a neutrino), some dilepton decays,
    initial-state radiation.
``wjets``
    W(->l nu)+jets: a falling jet multiplicity, rare heavy flavour; the W
    recoils against the jets and decays isotropically in its rest frame.
``dy``
    Drell-Yan Z(->ll)+jets: two opposite-charge same-flavour leptons with an
    invariant mass near 91 GeV, little MET.

Every event also gets soft pileup jets and some fake (loose, non-isolated)
leptons; jets, leptons and MET are smeared with detector resolutions, and
b-tag scores (``Jet_btagDeepFlavB``) follow the jet flavour. A classifier that
separates ``ttbar`` from ``wjets`` + ``dy`` after a typical l+jets selection
reaches an AUC near 0.9: clearly better than chance, far from perfect.

Run it from a shell::

    python -m cmsmlkit.data.toy demo_data 20000    # or: cmsml demo

or from Python:

>>> from cmsmlkit.data import toy
>>> files = toy.make_demo("demo_data", n_events=1000)  # doctest: +SKIP
>>> toy.write_nanoaod("ttbar.root", "ttbar", 500, seed=3)  # doctest: +SKIP
PosixPath('ttbar.root')

Notes
-----
uproot writes the counters ``nJet``, ... as ``int32``; CMSSW writes ``uint32``.
Readers treat both alike.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, did_you_mean

__all__ = [
    "PROCESSES",
    "MIXTURE",
    "DEMO_SKIM",
    "DEMO_PADDING",
    "write_nanoaod",
    "make_demo",
    "generate",
    "two_body_decay",
]

#: A compact demo selection for these files (a slimmer form of the packaged demo
#: pipeline's), as a ``SkimConfig`` mapping: what tests, benchmarks and examples share.
DEMO_SKIM = {
    "selection": {
        "objects": {
            "GoodJet": {"from": "Jet", "where": "pt > 25 & abs(eta) < 2.4 & jetId >= 2"},
            "GoodMuon": {"from": "Muon", "where": "pt > 20 & abs(eta) < 2.4 & tightId"},
            "GoodElectron": {
                "from": "Electron",
                "where": "pt > 20 & abs(eta) < 2.5 & cutBased >= 3",
            },
        },
        "cuts": ["num(GoodJet) >= 2", "num(GoodMuon) + num(GoodElectron) >= 1"],
        "variables": {
            "ht": "sum(GoodJet.pt)",
            "n_bjets": "num(GoodJet[GoodJet.btagDeepFlavB > 0.3])",
            "met": "MET.pt",
        },
    },
    "collections": {
        "GoodJet": ["pt", "eta", "btagDeepFlavB"],
        "GoodMuon": ["pt", "eta"],
        "GoodElectron": ["pt"],
    },
}
#: Padding for :data:`DEMO_SKIM`'s collections, as ``ConvertConfig.collections``.
DEMO_PADDING = {
    "GoodJet": {"max_len": 5},
    "GoodMuon": {"max_len": 2},
    "GoodElectron": {"max_len": 2},
}

#: The processes the generator knows, signal first.
PROCESSES = ("ttbar", "wjets", "dy")

#: Fractions of each process in the ``new`` pseudo-data file of :func:`make_demo`.
MIXTURE = {"ttbar": 0.3, "wjets": 0.45, "dy": 0.25}

#: |genWeight| per process, and the fraction of negative weights (NLO generators).
_GEN_WEIGHT = {"ttbar": (1.0, 0.02), "wjets": (2.5, 0.04), "dy": (1.5, 0.05)}

_M_W, _G_W = 80.38, 2.09
_M_Z, _G_Z = 91.19, 2.50
_M_MU, _M_E = 0.10566, 0.000511

_JET_FIELDS = {
    "pt": np.float32,
    "eta": np.float32,
    "phi": np.float32,
    "mass": np.float32,
    "btagDeepFlavB": np.float32,
    "jetId": np.int32,
    "hadronFlavour": np.int32,
}
_MUON_FIELDS = {
    "pt": np.float32,
    "eta": np.float32,
    "phi": np.float32,
    "mass": np.float32,
    "charge": np.int32,
    "tightId": np.bool_,
    "pfRelIso04_all": np.float32,
}
_ELECTRON_FIELDS = {
    "pt": np.float32,
    "eta": np.float32,
    "phi": np.float32,
    "mass": np.float32,
    "charge": np.int32,
    "cutBased": np.int32,
}
_SCALARS = {
    "run": np.uint32,
    "luminosityBlock": np.uint32,
    "event": np.uint64,
    "genWeight": np.float32,
    "MET_pt": np.float32,
    "MET_phi": np.float32,
}
_EVENTS_PER_LUMI = 500


# --------------------------------------------------------------------------- kinematics


def _pxpypz(pt: np.ndarray, eta: np.ndarray, phi: np.ndarray) -> tuple[np.ndarray, ...]:
    return pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)


def _pt_eta_phi(px: np.ndarray, py: np.ndarray, pz: np.ndarray) -> tuple[np.ndarray, ...]:
    pt = np.hypot(px, py)
    return pt, np.arcsinh(pz / np.maximum(pt, 1e-9)), np.arctan2(py, px)


def _per_event(evt: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
    """Sum of ``weights`` per event (float even when there is nothing to add)."""
    return np.bincount(evt, weights=weights, minlength=n).astype(np.float64)


def _breit_wigner(rng: np.random.Generator, mass: float, width: float, n: int) -> np.ndarray:
    """Relativistic-looking Cauchy line shape, cut to mass +- 15 widths."""
    m = mass + 0.5 * width * rng.standard_cauchy(n)
    bad = np.abs(m - mass) > 15 * width
    while bad.any():
        m[bad] = mass + 0.5 * width * rng.standard_cauchy(int(bad.sum()))
        bad = np.abs(m - mass) > 15 * width
    return m


def two_body_decay(
    rng: np.random.Generator,
    pt: np.ndarray,
    eta: np.ndarray,
    phi: np.ndarray,
    mass: np.ndarray,
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Isotropic decay of a parent into two massless daughters.

    Returns ``((pt1, eta1, phi1), (pt2, eta2, phi2))``; the daughters are back
    to back with momentum ``mass / 2`` in the parent's rest frame.
    """
    n = len(pt)
    px, py, pz = _pxpypz(pt, eta, phi)
    energy = np.sqrt(px**2 + py**2 + pz**2 + mass**2)
    bx, by, bz = px / energy, py / energy, pz / energy
    b2 = np.maximum(bx**2 + by**2 + bz**2, 1e-12)
    gamma = energy / mass
    cos_t = rng.uniform(-1.0, 1.0, n)
    sin_t = np.sqrt(1.0 - cos_t**2)
    phi_s = rng.uniform(-np.pi, np.pi, n)
    p_star = mass / 2
    daughters = []
    for sign in (1.0, -1.0):
        qx = sign * p_star * sin_t * np.cos(phi_s)
        qy = sign * p_star * sin_t * np.sin(phi_s)
        qz = sign * p_star * cos_t
        bq = bx * qx + by * qy + bz * qz
        k = (gamma - 1.0) * bq / b2 + gamma * p_star
        daughters.append(_pt_eta_phi(qx + k * bx, qy + k * by, qz + k * bz))
    return daughters[0], daughters[1]


def _recoil(
    rng: np.random.Generator, n: int, jet_evt: np.ndarray, jet_pt: np.ndarray, jet_phi: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """pt and phi of a boson balancing the jets of each event (plus intrinsic kT)."""
    px = -_per_event(jet_evt, jet_pt * np.cos(jet_phi), n)
    py = -_per_event(jet_evt, jet_pt * np.sin(jet_phi), n)
    px += rng.normal(0.0, 6.0, n)
    py += rng.normal(0.0, 6.0, n)
    return np.hypot(px, py), np.arctan2(py, px)


# --------------------------------------------------------------------------- objects


class _Parts:
    """Flat lists of generated objects, each tagged with its event index."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.columns: dict[str, list[np.ndarray]] = {}

    def add(self, **columns: np.ndarray) -> None:
        """Book objects; those given without a ``phi`` get a uniform one."""
        if "phi" not in columns:
            columns["phi"] = self.rng.uniform(-np.pi, np.pi, len(columns["evt"]))
        for key, value in columns.items():
            self.columns.setdefault(key, []).append(np.asarray(value))

    def flat(self) -> dict[str, np.ndarray]:
        return {key: np.concatenate(values) for key, values in self.columns.items()}


def _poisson_objects(rng: np.random.Generator, n: int, mean: float) -> np.ndarray:
    """Event index of each object when every event gets Poisson(mean) objects."""
    return np.repeat(np.arange(n), rng.poisson(mean, n))


def _btag(rng: np.random.Generator, flavour: np.ndarray, abseta: np.ndarray) -> np.ndarray:
    """DeepJet-like b-tag scores: near 1 for most b jets, near 0 for light jets."""
    n = len(flavour)
    light = rng.beta(0.7, 9.0, n)
    charm = rng.beta(1.3, 5.0, n)
    b_good = rng.beta(8.0, 1.2, n)
    b_bad = rng.beta(1.2, 5.0, n)
    bottom = np.where(rng.random(n) < 0.65, b_good, b_bad)
    score = np.where(flavour == 5, bottom, np.where(flavour == 4, charm, light))
    # no tracker beyond |eta| = 2.5: nothing to tag there
    return np.where(abseta > 2.5, light * 0.3, score)


def _jets(
    rng: np.random.Generator, n: int, parts: _Parts
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Reconstructed jets from true partons; returns (sorted fields, event index, MET shift x/y)."""
    flat = parts.flat()
    evt, true_pt, eta, flav, pileup = (
        flat["evt"],
        flat["pt"],
        flat["eta"],
        flat["flavour"],
        flat["pileup"],
    )
    phi = flat["phi"]
    sigma = 0.06 + 1.0 / np.sqrt(np.maximum(true_pt, 1.0))
    pt = true_pt * np.clip(rng.normal(1.0, sigma), 0.3, None)
    # the mismeasured part of each jet shows up as fake MET
    dpt = true_pt - pt
    shift_x = _per_event(evt, dpt * np.cos(phi), n)
    shift_y = _per_event(evt, dpt * np.sin(phi), n)
    keep = (pt > 15.0) & (np.abs(eta) < 4.7)
    evt, pt, eta, phi, flav, pileup = (a[keep] for a in (evt, pt, eta, phi, flav, pileup))
    m = len(evt)
    mass = pt * np.exp(rng.normal(np.log(0.11), 0.35, m)) * np.where(flav == 5, 1.3, 1.0)
    jet_id = np.where(
        pileup,
        rng.choice([0, 2, 6], m, p=[0.15, 0.10, 0.75]),
        rng.choice([0, 2, 6], m, p=[0.02, 0.05, 0.93]),
    )
    fields = {
        "pt": pt,
        "eta": eta,
        "phi": phi,
        "mass": mass,
        "btagDeepFlavB": _btag(rng, flav, np.abs(eta)),
        "jetId": jet_id,
        "hadronFlavour": flav,
    }
    order = np.lexsort((-pt, evt))
    return {k: v[order] for k, v in fields.items()}, evt[order], np.stack([shift_x, shift_y])


def _leptons(
    rng: np.random.Generator, n: int, parts: _Parts, flavour: str
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Reconstructed muons or electrons from prompt and fake candidates."""
    flat = parts.flat()
    is_mu = flavour == "mu"
    chosen = flat["flavour"] == (13 if is_mu else 11)
    evt, true_pt, eta, phi, charge, prompt = (
        flat[k][chosen] for k in ("evt", "pt", "eta", "phi", "charge", "prompt")
    )
    resolution = 0.015 if is_mu else 0.025
    pt = true_pt * rng.normal(1.0, resolution, len(evt))
    dpt = true_pt - pt
    shift = np.stack(
        [
            _per_event(evt, dpt * np.cos(phi), n),
            _per_event(evt, dpt * np.sin(phi), n),
        ]
    )
    eff = 0.96 if is_mu else 0.90
    keep = (
        (pt > (3.0 if is_mu else 5.0))
        & (np.abs(eta) < (2.4 if is_mu else 2.5))
        & (~prompt | (rng.random(len(evt)) < eff))
    )
    evt, pt, eta, phi, charge, prompt = (a[keep] for a in (evt, pt, eta, phi, charge, prompt))
    m = len(evt)
    fields: dict[str, np.ndarray] = {
        "pt": pt,
        "eta": eta,
        "phi": phi,
        "mass": np.full(m, _M_MU if is_mu else _M_E),
        "charge": charge,
    }
    if is_mu:
        fields["tightId"] = np.where(prompt, rng.random(m) < 0.97, rng.random(m) < 0.3)
        fields["pfRelIso04_all"] = np.where(
            prompt, rng.exponential(0.04, m), rng.exponential(0.35, m)
        )
    else:
        fields["cutBased"] = np.where(
            prompt,
            rng.choice(5, m, p=[0.02, 0.04, 0.09, 0.15, 0.70]),
            rng.choice(5, m, p=[0.40, 0.30, 0.16, 0.09, 0.05]),
        )
    order = np.lexsort((-pt, evt))
    return {k: v[order] for k, v in fields.items()}, evt[order], shift


def _add_prompt_leptons(
    rng: np.random.Generator,
    leptons: _Parts,
    evt: np.ndarray,
    pair: tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]],
    charged: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Book the daughters of W or Z decays; returns the neutrino px, py per decay.

    ``charged`` is ``"one"`` (W -> l nu: the first daughter is the lepton) or
    ``"two"`` (Z -> l l, same flavour, opposite charge).
    """
    k = len(evt)
    flavour = np.where(rng.random(k) < 0.5, 13, 11)
    charge = np.where(rng.random(k) < 0.5, 1, -1)
    (pt1, eta1, phi1), (pt2, eta2, phi2) = pair
    prompt = np.ones(k, dtype=bool)
    leptons.add(evt=evt, pt=pt1, eta=eta1, phi=phi1, flavour=flavour, charge=charge, prompt=prompt)
    if charged == "two":
        leptons.add(
            evt=evt, pt=pt2, eta=eta2, phi=phi2, flavour=flavour, charge=-charge, prompt=prompt
        )
        return np.zeros(k), np.zeros(k)
    return pt2 * np.cos(phi2), pt2 * np.sin(phi2)


def _hadronic_jets(rng: np.random.Generator, n: int, jets: _Parts, lam: float, hf: float) -> None:
    """A falling number of QCD jets per event (P(k) ~ lam**k); a fraction ``hf`` are b/c events."""
    n_jets = np.minimum(rng.geometric(1.0 - lam, n) - 1, 6)
    evt = np.repeat(np.arange(n), n_jets)
    m = len(evt)
    pt = 15.0 + rng.exponential(38.0, m) + rng.exponential(8.0, m)
    # the leading jets are harder: scale down with the jet's rank in its event
    rank = np.arange(m) - np.repeat(np.cumsum(n_jets) - n_jets, n_jets)
    pt = 15.0 + (pt - 15.0) * (1.6 / (1.0 + 0.3 * rank))
    flavour = np.zeros(m, dtype=np.int64)
    heavy = np.repeat(rng.random(n) < hf, n_jets) & (rank < 2)
    flavour[heavy] = np.where(rng.random(int(heavy.sum())) < 0.45, 5, 4)
    light_heavy = (rng.random(m) < 0.04) & (flavour == 0)
    flavour[light_heavy] = 4
    jets.add(evt=evt, pt=pt, eta=rng.normal(0.0, 1.7, m), flavour=flavour, pileup=np.zeros(m, bool))


def _pileup_and_fakes(rng: np.random.Generator, n: int, jets: _Parts, leptons: _Parts) -> None:
    evt = _poisson_objects(rng, n, 2.0)
    m = len(evt)
    jets.add(
        evt=evt,
        pt=12.0 + rng.exponential(7.0, m),
        eta=rng.uniform(-4.7, 4.7, m),
        flavour=np.zeros(m, dtype=np.int64),
        pileup=np.ones(m, bool),
    )
    for flavour, mean, soft in ((13, 0.25, 6.0), (11, 0.35, 8.0)):
        evt = _poisson_objects(rng, n, mean)
        m = len(evt)
        leptons.add(
            evt=evt,
            pt=3.0 + rng.exponential(soft, m),
            eta=rng.uniform(-2.5, 2.5, m),
            phi=rng.uniform(-np.pi, np.pi, m),
            flavour=np.full(m, flavour),
            charge=np.where(rng.random(m) < 0.5, 1, -1),
            prompt=np.zeros(m, bool),
        )


def _ttbar(
    rng: np.random.Generator, n: int, jets: _Parts, leptons: _Parts
) -> tuple[np.ndarray, ...]:
    ev = np.arange(n)
    dilepton = rng.random(n) < 0.2
    # two b quarks from the top decays
    for _ in range(2):
        jets.add(
            evt=ev,
            pt=rng.gamma(3.0, 22.0, n),
            eta=rng.normal(0.0, 1.3, n),
            flavour=np.full(n, 5),
            pileup=np.zeros(n, bool),
        )
    nu_x, nu_y = np.zeros(n), np.zeros(n)
    # the leptonic W of every event, and the second one of dilepton events
    for which in (ev, ev[dilepton]):
        k = len(which)
        pair = two_body_decay(
            rng,
            rng.gamma(2.0, 40.0, k),
            rng.normal(0.0, 1.1, k),
            rng.uniform(-np.pi, np.pi, k),
            _breit_wigner(rng, _M_W, _G_W, k),
        )
        px, py = _add_prompt_leptons(rng, leptons, which, pair, "one")
        nu_x += _per_event(which, px, n)
        nu_y += _per_event(which, py, n)
    # the hadronic W of lepton+jets events: two light (sometimes charm) jets
    had = ev[~dilepton]
    k = len(had)
    (pt1, eta1, phi1), (pt2, eta2, phi2) = two_body_decay(
        rng,
        rng.gamma(2.0, 40.0, k),
        rng.normal(0.0, 1.1, k),
        rng.uniform(-np.pi, np.pi, k),
        _breit_wigner(rng, _M_W, _G_W, k),
    )
    charm = np.where(rng.random(k) < 0.5, 4, 0)
    jets.add(evt=had, pt=pt1, eta=eta1, phi=phi1, flavour=charm, pileup=np.zeros(k, bool))
    jets.add(
        evt=had, pt=pt2, eta=eta2, phi=phi2, flavour=np.zeros(k, int), pileup=np.zeros(k, bool)
    )
    # initial-state radiation
    isr = _poisson_objects(rng, n, 0.7)
    k = len(isr)
    jets.add(
        evt=isr,
        pt=15.0 + rng.exponential(30.0, k),
        eta=rng.normal(0.0, 1.8, k),
        flavour=np.zeros(k, int),
        pileup=np.zeros(k, bool),
    )
    return nu_x, nu_y


def _vjets(
    rng: np.random.Generator, n: int, jets: _Parts, leptons: _Parts, boson: str
) -> tuple[np.ndarray, ...]:
    ev = np.arange(n)
    if boson == "W":
        _hadronic_jets(rng, n, jets, lam=0.55, hf=0.2)
        mass = _breit_wigner(rng, _M_W, _G_W, n)
    else:
        _hadronic_jets(rng, n, jets, lam=0.35, hf=0.06)
        mass = _breit_wigner(rng, _M_Z, _G_Z, n)
    flat = jets.flat()
    pt, bphi = _recoil(rng, n, flat["evt"], flat["pt"], flat["phi"])
    # the boson's rapidity: forward more often than top pairs
    pair = two_body_decay(rng, pt, rng.normal(0.0, 1.6, n), bphi, mass)
    return _add_prompt_leptons(rng, leptons, ev, pair, "one" if boson == "W" else "two")


# --------------------------------------------------------------------------- generation


def _generate_process(process: str, n: int, rng: np.random.Generator) -> dict[str, Any]:
    jets = _Parts(rng)
    leptons = _Parts(rng)
    if process == "ttbar":
        nu_x, nu_y = _ttbar(rng, n, jets, leptons)
    else:
        nu_x, nu_y = _vjets(rng, n, jets, leptons, "W" if process == "wjets" else "Z")
    _pileup_and_fakes(rng, n, jets, leptons)
    jet, jet_evt, jet_shift = _jets(rng, n, jets)
    muon, muon_evt, mu_shift = _leptons(rng, n, leptons, "mu")
    electron, el_evt, el_shift = _leptons(rng, n, leptons, "e")
    # MET: neutrinos, minus the mismeasurement of the visible objects, plus soft terms
    sum_pt = _per_event(jet_evt, jet["pt"], n)
    sigma = 6.0 + 0.5 * np.sqrt(sum_pt)
    met_x = nu_x + jet_shift[0] + mu_shift[0] + el_shift[0] + rng.normal(0.0, 1.0, n) * sigma
    met_y = nu_y + jet_shift[1] + mu_shift[1] + el_shift[1] + rng.normal(0.0, 1.0, n) * sigma
    scale, negative = _GEN_WEIGHT[process]
    magnitude = scale * (np.exp(rng.normal(0.0, 0.1, n)) if process == "ttbar" else np.ones(n))
    gen_weight = np.where(rng.random(n) < negative, -magnitude, magnitude)
    return {
        "genWeight": gen_weight,
        "MET_pt": np.hypot(met_x, met_y),
        "MET_phi": np.arctan2(met_y, met_x),
        "Jet": (np.bincount(jet_evt, minlength=n), jet),
        "Muon": (np.bincount(muon_evt, minlength=n), muon),
        "Electron": (np.bincount(el_evt, minlength=n), electron),
    }


_FIELDS = {"Jet": _JET_FIELDS, "Muon": _MUON_FIELDS, "Electron": _ELECTRON_FIELDS}


def generate(process: str, n_events: int, seed: int | np.random.Generator = 0) -> dict[str, Any]:
    """Simulate ``n_events`` events of one process (or ``"new"``, the demo mixture) in memory.

    Returns the branches as uproot's ``extend`` takes them: numpy arrays for
    the per-event branches, jagged awkward record arrays for ``Jet``,
    ``Muon`` and ``Electron``; ``event`` runs from 1 to ``n_events``.

    >>> chunk = generate("dy", 100, seed=1)
    >>> len(chunk["Jet"]), chunk["Muon"].fields[:3]
    (100, ['pt', 'eta', 'phi'])
    """
    import awkward as ak

    _check_process(process, allow_new=True)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if process == "new":
        counts = rng.multinomial(n_events, list(MIXTURE.values()))
        pieces = [_generate_process(p, int(k), rng) for p, k in zip(MIXTURE, counts, strict=True)]
        order = rng.permutation(n_events)
    else:
        pieces = [_generate_process(process, n_events, rng)]
        order = None
    out: dict[str, Any] = {}
    for key in ("genWeight", "MET_pt", "MET_phi"):
        out[key] = np.concatenate([p[key] for p in pieces]).astype(_SCALARS[key])
    for name, dtypes in _FIELDS.items():
        counts = np.concatenate([p[name][0] for p in pieces])
        fields = {
            f: np.concatenate([p[name][1][f] for p in pieces]).astype(dtype)
            for f, dtype in dtypes.items()
        }
        out[name] = ak.unflatten(ak.zip(fields), counts)
    if order is not None:
        for key, value in out.items():
            out[key] = ak.to_packed(value[order]) if isinstance(value, ak.Array) else value[order]
    return out


# --------------------------------------------------------------------------- files


def _check_process(process: str, allow_new: bool = False) -> None:
    valid = PROCESSES + (("new",) if allow_new else ())
    if process not in valid:
        raise ConfigError(
            f"unknown toy process {process!r}; valid processes: {', '.join(valid)}."
            + did_you_mean(process, valid)
        )


def write_nanoaod(
    path: str | Path,
    process: str,
    n_events: int,
    seed: int = 0,
    *,
    chunk_size: int = 100_000,
) -> Path:
    """Write one toy NanoAOD file of ``n_events`` events of ``process``.

    Parameters
    ----------
    path
        The ROOT file to write; its directory is created. The file is written
        under ``<name>.tmp`` and renamed when complete.
    process
        One of :data:`PROCESSES`, or ``"new"`` for the demo mixture of all three
        (fractions :data:`MIXTURE`).
    n_events
        Number of events (``0`` writes an empty tree).
    seed
        The same seed (and ``chunk_size``) gives the same file.
    chunk_size
        Events generated and written at a time (memory stays bounded).

    Returns
    -------
    Path
        ``path``.

    Examples
    --------
    >>> write_nanoaod("ttbar.root", "ttbar", 1000, seed=3)  # doctest: +SKIP
    PosixPath('ttbar.root')
    """
    import uproot

    _check_process(process, allow_new=True)
    if not isinstance(n_events, (int, np.integer)) or n_events < 0:
        raise ConfigError(f"n_events must be a non-negative integer, not {n_events!r}.")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be at least 1, not {chunk_size!r}.")
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _process_id(process)]))
    try:
        with uproot.recreate(tmp) as file:
            tree = None
            first = 0
            sumw = sumw2 = 0.0
            while first < n_events or tree is None:
                n = int(min(chunk_size, n_events - first))
                chunk = _with_event_id(generate(process, n, rng), first)
                if tree is None:
                    tree = file.mktree("Events", _branch_types(chunk))
                if n:
                    tree.extend(chunk)
                weights = chunk["genWeight"].astype(np.float64)
                sumw += float(weights.sum())
                sumw2 += float((weights**2).sum())
                first += n
            runs = file.mktree(
                "Runs",
                {
                    "run": np.uint32,
                    "genEventCount": np.int64,
                    "genEventSumw": np.float64,
                    "genEventSumw2": np.float64,
                },
            )
            runs.extend(
                {
                    "run": np.array([1], np.uint32),
                    "genEventCount": np.array([n_events], np.int64),
                    "genEventSumw": np.array([sumw]),
                    "genEventSumw2": np.array([sumw2]),
                }
            )
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def _process_id(process: str) -> int:
    return (*PROCESSES, "new").index(process)


def _with_event_id(chunk: dict[str, Any], first: int) -> dict[str, Any]:
    """Monte Carlo numbering, as CMSSW does it: run 1, luminosity blocks of fixed size."""
    n = len(chunk["genWeight"])
    event = np.arange(first + 1, first + n + 1, dtype=np.uint64)
    ids = {
        "run": np.ones(n, np.uint32),
        "luminosityBlock": ((event - 1) // _EVENTS_PER_LUMI + 1).astype(np.uint32),
        "event": event,
    }
    return {**ids, **chunk}


def _branch_types(chunk: Mapping[str, Any]) -> dict[str, Any]:
    types: dict[str, Any] = {}
    for key, value in chunk.items():
        types[key] = value.dtype if isinstance(value, np.ndarray) else value.type
    return types


def make_demo(out_dir: str | Path, n_events: int = 20000, seed: int = 1) -> dict[str, list[Path]]:
    """Write the demo inputs: ``ttbar.root``, ``wjets.root``, ``dy.root`` and ``new.root``.

    Each process file holds ``n_events`` events; ``new.root`` is unlabelled
    pseudo-data, a seeded mixture of the three (``n_events`` in total, with
    genWeight). Returns ``{"ttbar": [path], "wjets": [path], "dy": [path],
    "new": [path]}``.

    >>> files = make_demo("demo_data", n_events=1000)  # doctest: +SKIP
    >>> files["ttbar"]  # doctest: +SKIP
    [PosixPath('demo_data/ttbar.root')]
    """
    out = Path(out_dir).expanduser()
    return {
        name: [write_nanoaod(out / f"{name}.root", name, n_events, seed=seed)]
        for name in (*PROCESSES, "new")
    }


def _main(argv: list[str]) -> int:
    if len(argv) not in (1, 2, 3) or argv[0] in ("-h", "--help"):
        print("usage: python -m cmsmlkit.data.toy OUT_DIR [N_EVENTS [SEED]]")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    n = int(argv[1]) if len(argv) > 1 else 20000
    seed = int(argv[2]) if len(argv) > 2 else 1
    for name, paths in make_demo(argv[0], n, seed).items():
        print(f"{name:>6}: {paths[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
