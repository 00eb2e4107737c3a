"""certbnn: Bayesian neural networks that are certifiably robust to adversarial inputs.

Implements the framework of *Bayesian Inference with Certifiable Adversarial
Robustness* (Wicker et al., AISTATS 2021): sound bound propagation (IBP, CROWN)
used as a robust likelihood inside approximate Bayesian inference, plus
certification, attacks and calibration of the resulting posteriors.
"""

__version__ = "0.1.0"

from certbnn.errors import CertbnnError

__all__ = ["CertbnnError", "__version__"]
