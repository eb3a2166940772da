"""The joint loss L = L_den + beta * L_out + lambda * L_dsl (+ the balancing adversary)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from creditgraph.model.batch import GraphBatch
from creditgraph.model.net import CreditGraphNet
from creditgraph.model.towers import effective_sample_size, ipw_weights, ziln_log_density

TRAIN, VAL, TEST = 0, 1, 2


@dataclass
class LossWeights:
    """Per-epoch weights from the schedule (see ``TrainConfig``)."""

    beta: float = 1.0
    lam: float = 0.0
    ipw: bool = True


def joint_loss(
    model: CreditGraphNet, out: dict[str, Tensor], batch: GraphBatch, split: int, w: LossWeights
) -> tuple[Tensor, dict[str, float]]:
    """Loss on the owned nodes of ``split`` (shadow nodes never enter) and its logged parts.

    * ``den``: ZILN negative log-likelihood of the observed limit (all owned users of the split);
    * ``out``: IPW-weighted BCE of default at the observed limit (labeled owned users), weights
      stabilized by the marginal ZILN, clipped, normalized to mean 1 (detached: the density tower
      is trained only by ``den``);
    * ``dsl``: mean of ``DSL_i * |y_i - p_i|``, DSL_i = the share of |alpha| missing for user i;
    * ``adv``: the treatment adversary's loss; through gradient reversal the encoder maximizes it.
    """
    cfg = model.cfg
    owned = batch.mask(split, labeled=False)
    lab = batch.mask(split, labeled=True)
    t = batch.treatment
    dens = {k: v[owned] for k, v in out["density"].items()}
    log_f = ziln_log_density(dens, t[owned], cfg.limit_scale)
    l_den = -log_f.mean() if owned.any() else out["logit"].sum() * 0

    y = batch.outcome[lab]
    logit = out["logit"][lab]
    if cfg.use_ipw and w.ipw and lab.any():
        dens_lab = {k: v[lab].detach() for k, v in out["density"].items()}
        weights = ipw_weights(
            model.marginal.log_density(t[lab]),
            ziln_log_density(dens_lab, t[lab], cfg.limit_scale),
            cfg.ipw_clip,
        )
    else:
        weights = torch.ones_like(y)
    bce = F.binary_cross_entropy_with_logits(logit, y, reduction="none")
    l_out = (weights * bce).mean() if lab.any() else l_den * 0

    l_dsl = l_den * 0
    if cfg.use_dsl and w.lam > 0 and lab.any():
        dsl = model.completeness(batch.omega[lab])
        l_dsl = (dsl * (y - torch.sigmoid(logit)).abs()).mean()

    l_adv = l_den * 0
    if model.adversary is not None and owned.any():
        adv = out["adversary"][owned]
        granted = (t[owned] > 0).float()
        l_adv = F.binary_cross_entropy_with_logits(adv[:, 0], granted)
        pos = t[owned] > 0
        if pos.any():
            target = model.limits(t[owned])[:, 1]
            l_adv = l_adv + F.mse_loss(adv[pos, 1], target[pos])

    total = l_den + w.beta * l_out + w.lam * l_dsl + l_adv
    parts = {
        "loss": float(total.detach()),
        "den": float(l_den.detach()),
        "out": float(l_out.detach()),
        "bce": float(bce.mean().detach()) if lab.any() else float("nan"),
        "dsl": float(l_dsl.detach()),
        "adv": float(l_adv.detach()),
        "ess": effective_sample_size(weights.detach()),
        "n_owned": int(owned.sum()),
        "n_labeled": int(lab.sum()),
    }
    return total, parts
