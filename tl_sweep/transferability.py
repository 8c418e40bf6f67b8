"""Transferability estimates: how well a frozen representation should transfer, computed before training.

Pure functions of a feature matrix (n images × D dimensions, from the frozen prefix, pooled) and the target
labels, or of the source model's predicted distribution over its own labels:

* :func:`logme` - LogME (You et al., ICML 2021): the log marginal evidence of a Bayesian linear model from the
  features to each one-hot target, maximised over its two precisions by the fixed-point iteration of the
  paper, in float64 on the SVD of the features (so D > n works: directions outside the features' span only
  add their prior term), averaged over classes, per image. Invariant to scaling the features.
* :func:`hscore` - H-score (Bao et al., ICIP 2019): ``tr(cov(f)^-1 cov(E[f|y]))``, the share of feature variance
  the classes explain; with the covariance shrunk (Ledoit-Wolf) as Ibrahim et al. (ICLR 2023) do, since the
  original saturates at ``classes - 1`` whenever the features have as many dimensions as there are images.
* :func:`leep` - LEEP (Nguyen et al., ICML 2020): the log-likelihood of the target labels under the source
  classifier's soft labels composed with the empirical P(y|z).
* :func:`nce` - NCE (Tran et al., ICCV 2019): -H(Y|Z), with Z the source classifier's hard labels.
* :func:`knn_probe` - a k-nearest-neighbour probe: the leave-one-out accuracy of a k-NN classifier on the
  features (standardised, cosine similarity). No theory, no fitted model: the baseline an estimator must beat
  to be worth its name (a plain k-NN probe on frozen features beat the published estimators in a large
  comparison of them), so the report says when none does.

Higher is better for all five. Each is a ranking device: compare cells of one study, never values across
datasets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


def logme(features: np.ndarray, labels: np.ndarray, *, tol: float = 1e-7, max_iter: int = 500) -> float:
    """LogME of ``features`` (n×D) for integer ``labels`` (n,): mean over classes of the maximised evidence / n."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    n, d = f.shape
    u, sigma, _ = np.linalg.svd(f, full_matrices=False)  # f = u diag(sigma) vt; k = min(n, d) directions
    keep = sigma > sigma.max(initial=0.0) * max(n, d) * np.finfo(np.float64).eps
    u, s = u[:, keep], sigma[keep] ** 2
    lo, hi = s.max() * 1e-12, s.max() * 1e12  # the ratio alpha/beta stays in the spectrum's own units
    out = []
    for c in np.unique(y):
        t_ = (y == c).astype(np.float64)
        z2 = (u.T @ t_) ** 2  # the target's energy along each feature direction
        outside = max(float(t_ @ t_ - z2.sum()), 0.0)  # what no linear map of the features can reach

        def at(ratio: float) -> tuple[float, float, float, float]:
            """(alpha, beta, |m|², |residual|²) of the evidence's fixed point equations at alpha/beta = ratio."""
            gamma = float((s / (s + ratio)).sum())  # effective number of parameters
            m2 = float((s * z2 / (s + ratio) ** 2).sum())
            res2 = outside + float((z2 * (ratio / (s + ratio)) ** 2).sum())
            alpha = gamma / max(m2, np.finfo(np.float64).tiny)
            beta = max(n - gamma, n * 1e-12) / max(res2, np.finfo(np.float64).tiny)
            return alpha, beta, m2, res2

        ratio = 1.0
        for _ in range(max_iter):  # MacKay's fixed point, as the paper: alpha = gamma/|m|², beta = (n-gamma)/|r|²
            alpha, beta, _, _ = at(ratio)
            new = min(max(alpha / beta, lo), hi)
            if abs(new - ratio) <= tol * ratio:
                ratio = new
                break
            ratio = new
        alpha, beta, m2, res2 = at(ratio)
        evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta)
                    - 0.5 * (np.log(alpha + beta * s).sum() + (d - len(s)) * np.log(alpha))
                    - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi))
        out.append(evidence / n)
    return float(np.mean(out))


def hscore(features: np.ndarray, labels: np.ndarray, *, shrinkage: float | None = None) -> float:
    """H-score ``tr(cov(f)^-1 cov(g))``, ``g`` each image's class-mean feature, with the feature covariance
    shrunk towards a scaled identity (Ledoit-Wolf; Ibrahim et al., ICLR 2023's regularised H-score).

    Without shrinkage the score saturates: when the features have at least ``n - 1`` dimensions the sample
    covariance is singular and ``tr(pinv(cov f) cov g)`` is exactly ``classes - 1`` for every representation.
    ``shrinkage=0`` gives the original definition (pseudo-inverse); ``None`` estimates it (Ledoit-Wolf).
    """
    f = np.asarray(features, dtype=np.float64)
    f = f - f.mean(axis=0)
    y = np.asarray(labels)
    g = np.zeros_like(f)
    for c in np.unique(y):
        g[y == c] = f[y == c].mean(axis=0)
    n = len(f)
    cov_f = f.T @ f / n
    cov_g = g.T @ g / n
    if shrinkage is None:
        from sklearn.covariance import ledoit_wolf_shrinkage

        shrinkage = float(ledoit_wolf_shrinkage(f, assume_centered=True))
    mu = np.trace(cov_f) / cov_f.shape[0]
    if shrinkage > 0:
        inv = np.linalg.inv((1 - shrinkage) * cov_f + shrinkage * mu * np.eye(cov_f.shape[0]))
        return float(np.trace(inv @ ((1 - shrinkage) * cov_g)))
    return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-10, hermitian=True) @ cov_g))


def _joint(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    classes = np.unique(y)
    onehot = (y[:, None] == classes[None, :]).astype(np.float64)  # n × C
    joint = onehot.T @ np.asarray(probs, dtype=np.float64) / len(y)  # P(y, z): C × Z
    return joint, onehot


def leep(source_probs: np.ndarray, labels: np.ndarray) -> float:
    """LEEP from the source classifier's probabilities over its own labels (n×Z) and the target labels."""
    theta = np.asarray(source_probs, dtype=np.float64)
    joint, onehot = _joint(theta, labels)
    p_y_given_z = joint / np.maximum(joint.sum(axis=0, keepdims=True), 1e-300)  # C × Z
    eep = theta @ p_y_given_z.T  # n × C: the expected empirical prediction
    return float(np.mean(np.log(np.maximum((eep * onehot).sum(axis=1), 1e-300))))


def nce(source_labels: np.ndarray, labels: np.ndarray) -> float:
    """NCE = -H(Y|Z) from the source classifier's hard labels ``z`` and the target labels."""
    z = np.asarray(source_labels)
    zs = np.unique(z)
    joint, _ = _joint((z[:, None] == zs[None, :]).astype(np.float64), labels)
    p_z = joint.sum(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(joint > 0, joint * np.log(joint / p_z), 0.0)
    return float(terms.sum())


KNN_K = 5  # neighbours of the k-NN probe, fewer where the smallest class has fewer other members


def knn_probe(features: np.ndarray, labels: np.ndarray, *, k: int = KNN_K) -> float:
    """Leave-one-out accuracy of a k-NN classifier on ``features`` (n×D; each dimension standardised, cosine
    similarity) for integer ``labels``: each image is classified by the majority label of its ``k`` most similar
    other images (k at most the smallest class's size − 1, at least 1); a tied vote goes to the label whose
    tied neighbours are the more similar in sum."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    f = (f - f.mean(axis=0)) / np.maximum(f.std(axis=0), 1e-12)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    _, counts = np.unique(y, return_counts=True)
    k = max(1, min(k, int(counts.min()) - 1, len(y) - 1))
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)  # leave one out: an image is not its own neighbour
    near = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    right = 0
    for i, idx in enumerate(near):
        votes: dict = {}
        for j in idx:
            n, total = votes.get(y[j], (0, 0.0))
            votes[y[j]] = (n + 1, total + sim[i, j])
        right += max(votes, key=lambda c: votes[c]) == y[i]
    return right / len(y)


ESTIMATES = {"logme": "LogME", "hscore": "H-score", "leep": "LEEP", "nce": "NCE", "knn": "k-NN probe"}
BASELINE = "knn"  # the estimate every other one must beat


# ------------------------------------------------------------------------------------- per study cell


@dataclass
class CellEstimate:
    """The estimates of one (arm, depth) cell, from the frozen prefix's features on the train split."""

    arm: str
    depth: int  # unfrozen blocks: the prefix is every block before the last ``depth``
    weights: str
    values: dict[str, float] = field(default_factory=dict)  # estimate name -> value (missing: not applicable)
    seconds: dict[str, float] = field(default_factory=dict)  # "features" and each estimate's compute time
    shape: tuple[int, int] = (0, 0)  # images × feature dimensions
    note: str = ""  # why a cell has no estimate, where the features came from

    @property
    def cell(self) -> str:
        return f"{self.arm}@k={self.depth}"


def cells_of(cfg) -> list[tuple[str, int]]:
    """A study's cells; for a plain sweep, every arm at every depth its space can draw."""
    if cfg.cells:
        return list(cfg.cells)
    from tl_sweep.spec import space_depths

    return [(arm, d) for arm in cfg.arms for d in space_depths(cfg.spec.search.space, cfg.max_blocks)]


def _pooled(x: np.ndarray) -> np.ndarray:
    """A split's stored prefix features, globally average-pooled where spatial, float64."""
    from tl_sweep import features

    import torch

    t = (x if torch.is_tensor(x) else features.to_tensor(np.asarray(x))).float()  # on a GPU: the device's copy
    return (t.flatten(2).mean(-1) if t.dim() > 2 else t).cpu().numpy().astype(np.float64)


def _source_probabilities(arch: str, weights: str, file: str | None, images, aug, device) -> np.ndarray | None:
    """The source model's own classifier on the target images (its probabilities over its own labels): a
    tl-sweep checkpoint (``source:`` models) or a torchvision weights enum; ``None`` without source labels."""
    import torch

    from tl_sweep import checkpoint, models

    if file is not None:
        try:
            model = checkpoint.build_model(checkpoint.load(file))
        except Exception:  # noqa: BLE001 - a bare state dict has no classifier over its own labels
            return None
    elif weights != "none" and (enum := models.torchvision_weights(arch, weights)) is not None:
        import torchvision

        model = torchvision.models.get_model(arch, weights=enum)
    else:
        return None
    model.eval().to(device)
    with torch.no_grad():
        return torch.cat([model(aug.eval(x.to(device))).float().softmax(1).cpu()
                          for x, _ in images(256, shuffle=False)]).numpy().astype(np.float64)


def estimate(ctx, cells: list[tuple[str, int]], log=print) -> list[CellEstimate]:
    """Every cell's estimates, from the frozen prefix's features on the train split of ``ctx`` (a
    :class:`~tl_sweep.contract.TrialContext`: search repeat 0's data). Each cell's features come from the same
    call a trial of that cell makes (:meth:`tl_sweep.train.Fit.prefix_features`, the model built with that
    trial's seed and cut at its depth), so they go to and come from the feature store the trials read: what is
    computed here is not computed again by training. With ``data.feature_cache: false`` they are computed for the
    estimates alone and nothing is stored."""
    import dataclasses

    from tl_sweep import models
    from tl_sweep.contract import TrialConfig
    from tl_sweep.train import Fit, device_for

    device = device_for(ctx.use_gpu)
    blocks = models.num_blocks(ctx.arch, ctx.input["crop"])
    store = ctx.feature_cache
    ctx = dataclasses.replace(ctx, feature_cache=True)  # the cut is made either way; stored only with the cache on
    out, probs = [], {}
    for arm, depth in cells:
        weights, file = ctx.arms[arm]
        est = CellEstimate(arm, depth, weights)
        out.append(est)
        if depth >= blocks:
            est.note = "every block trains: no frozen prefix to score"
            continue
        t0 = time.perf_counter()
        # the fit a trial of this cell makes (search repeat 0's seed), at its depth
        fit = Fit(ctx, TrialConfig.of(arm=arm, seed=ctx.seed, unfrozen_blocks=depth, epochs=1), device)
        fit.store_features = store
        fit.set_depth(depth)
        if fit.split is None:
            est.note = f"the model cannot be cut at this depth ({'; '.join(fit.notes)})"
            continue
        feats = fit.prefix_features("train")
        est.note = "; ".join(fit.notes)
        if feats is None:
            continue
        images = fit.batches["train"]
        f, y = _pooled(feats.x), images.y.cpu().numpy()
        est.seconds["features"] = time.perf_counter() - t0
        est.shape = f.shape
        for key, fn in (("logme", logme), ("hscore", hscore), ("knn", knn_probe)):
            t = time.perf_counter()
            est.values[key] = fn(f, y)
            est.seconds[key] = time.perf_counter() - t
        if arm not in probs:
            t = time.perf_counter()
            probs[arm] = (_source_probabilities(ctx.arch, weights, file, images, fit.aug, device),
                          time.perf_counter() - t)
        p, secs = probs[arm]
        if p is not None:
            t = time.perf_counter()
            est.values["leep"] = leep(p, y)
            est.values["nce"] = nce(p.argmax(1), y)
            est.seconds["source_labels"] = secs + time.perf_counter() - t
        log(f"estimate: {est.cell}: " + ", ".join(f"{ESTIMATES[k]} {v:.4f}" for k, v in est.values.items())
            + f" ({f.shape[0]}×{f.shape[1]} features, {sum(est.seconds.values()):.1f}s)")
    return out


def _key(arm: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in arm)


PREFIX = "transferability"  # MLflow's chart view orders sections by name: the study's results (study/) come first
_PREFIXES = (PREFIX, "estimate")  # and the name runs recorded before 2026-12-04 used


def metrics_of(estimates: list[CellEstimate]) -> dict[str, float]:
    """MLflow metrics: ``transferability/<arm>/k<depth>/<name>`` (and ``.../seconds``)."""
    out = {}
    for e in estimates:
        for name, v in e.values.items():
            out[f"{PREFIX}/{_key(e.arm)}/k{e.depth}/{name}"] = v
        if e.seconds:
            out[f"{PREFIX}/{_key(e.arm)}/k{e.depth}/seconds"] = sum(e.seconds.values())
    return out


def read_metrics(metrics: dict[str, float], arms: list[str]) -> dict[tuple[str, int], dict[str, float]]:
    """Back from :func:`metrics_of`: (arm, depth) -> {estimate: value}, for the given arm names."""
    by_key = {_key(a): a for a in arms}
    out: dict[tuple[str, int], dict[str, float]] = {}
    for k, v in metrics.items():
        parts = k.split("/")
        if len(parts) == 4 and parts[0] in _PREFIXES and parts[1] in by_key and parts[3] in ESTIMATES:
            out.setdefault((by_key[parts[1]], int(parts[2].removeprefix("k"))), {})[parts[3]] = v
    return out


def ranks(values: dict[str, float]) -> dict[str, int]:
    """1 = the highest value; equal values share a rank (1, 1, 3)."""
    return {c: 1 + sum(v > values[c] for v in values.values()) for c in values}


def table(estimates: list[CellEstimate]) -> str:
    """A markdown table: each cell's estimates with their rank among the cells (1 = predicted best)."""
    names = [n for n in ESTIMATES if any(n in e.values for e in estimates)]
    rk = {n: ranks({e.cell: e.values[n] for e in estimates if n in e.values}) for n in names}
    lines = ["| cell | " + " | ".join(f"{ESTIMATES[n]} (rank)" for n in names) + " | features | seconds |",
             "|---|" + "---|" * len(names) + "---|---|"]
    for e in estimates:
        vals = [f"{e.values[n]:.4f} ({rk[n][e.cell]})" if n in e.values else "–" for n in names]
        feats = f"{e.shape[0]}×{e.shape[1]}" if e.values else e.note
        lines.append(f"| {e.cell} | " + " | ".join(vals) + f" | {feats} | {sum(e.seconds.values()):.2f} |")
    return "\n".join(lines)
