"""The ``factgrass_sm`` method of the LDS evaluation: FactGraSS with the paper's selective mask,
fitted by the product's ``fit-mask`` code on a calibration set that never sees the evaluation.

Calibration (no leakage): training examples only. A seeded sample of ``mask_train`` training
examples is the train side; ``mask_targets`` *other* training examples, in query form (only
the answer word a target, like the queries), are the target side. The held-out queries that
the LDS is measured on are never used. The masks are written to a mask file and the method's
specs name it (``factgrass:...,mask=PATH``), so attribution runs through the product's path.

Shapes: N examples, P = d_out * d_in per layer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from grass_llm.compress import build_compressor, derive_seed
from grass_llm.compress.mask_file import write_mask_file
from grass_llm.evaluation.corpus import Corpus, answer_only
from grass_llm.fit_mask import fit_layer


def calibration_rows(n: int, n_train: int, n_targets: int, seed: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint training-set rows ``([n_train], [n_targets])`` of the mask calibration."""
    if n_train < 3 or n_targets < 1 or n_train + n_targets > n:
        raise ValueError(f"the mask calibration needs 3 <= mask_train and 1 <= mask_targets "
                         f"with mask_train + mask_targets <= {n} training examples, got "
                         f"{n_train} + {n_targets}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_train], perm[n_train:n_train + n_targets]


def calibration_batches(corpus: Corpus, n_train: int, n_targets: int, seed: int):
    """``(train side, target side)`` batches ``(ids, mask, labels)`` of ``calibration_rows``,
    both from the training set; the target side in query form."""
    tr, te = calibration_rows(len(corpus.train), n_train, n_targets, seed)
    ids, mask, labels = corpus.train_batch()
    return (ids[tr], mask[tr], labels[tr]), answer_only(ids[te], mask[te], labels[te])


def fit_masks(plans: list, g_train: dict[str, torch.Tensor], g_targets: dict[str, torch.Tensor],
              cfg, path: Path) -> dict:
    """Fit every layer's masks for ``plans`` (the factgrass specs of one k) from exact
    calibration gradients, write them to ``path`` and point the plans' specs at it.

    Args:
        plans: ``LayerPlan`` list of the method (factgrass specs); replaced in place by plans
            whose spec names the mask file.
        g_train, g_targets: ``{layer: [N, P]}`` exact gradients of the calibration sides.
        cfg: the ``LDSConfig`` (capture seed, mask fit settings).
        path: where to write the mask file.

    Returns:
        A JSON-serializable summary: per layer the learned and the random mask's objective on
        the calibration set, their means, the file's SHA-256.
    """
    masks, per_layer = {}, {}
    for pl in plans:
        d_out, d_in = pl.shape
        for name in pl.layers:
            comp = build_compressor(pl.spec, seed=derive_seed(cfg.capture_seed, name),
                                    d_in=d_in, d_out=d_out, layer=name)
            masks[name], res = fit_layer(name, comp, g_train[name], g_targets[name],
                                         steps=cfg.mask_steps, lr=cfg.mask_lr, l1=cfg.mask_l1,
                                         seed=cfg.capture_seed)
            per_layer[name] = {"learned": res.objective, "random": res.random_objective,
                               "step": res.step}
    sha = write_mask_file(path, masks, {"calibration": {
        "train_rows": cfg.mask_train, "target_rows": cfg.mask_targets,
        "source": "training set only (targets in query form)"}})
    plans[:] = [dataclasses.replace(pl, spec=f"{pl.spec},mask={path}") for pl in plans]
    return {"sha256": sha, "per_layer": per_layer,
            "learned": float(np.mean([v["learned"] for v in per_layer.values()])),
            "random": float(np.mean([v["random"] for v in per_layer.values()]))}
