"""Evaluation of posteriors: attacks on the predictive, certificates, calibration and OOD.

Modules: :mod:`~certbnn.evaluation.certify` (certificates and radii),
:mod:`~certbnn.evaluation.stats` (sample sizes, Clopper-Pearson),
:mod:`~certbnn.evaluation.metrics` (calibration, uncertainty, AUROC),
:mod:`~certbnn.evaluation.robustness` (EOT attacks on the posterior predictive).
"""

CERTIFICATES = ("per-sample", "paper", "statistical", "weight-box", "decision")
ATTACKS = ("fgsm", "pgd")
