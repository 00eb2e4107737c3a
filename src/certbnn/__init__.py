"""certbnn: Bayesian neural networks that are certifiably robust to adversarial inputs.

Implements the framework of *Bayesian Inference with Certifiable Adversarial
Robustness* (Wicker et al., AISTATS 2021): sound bound propagation (IBP, CROWN)
used as a robust likelihood inside approximate Bayesian inference, plus
certification, attacks and calibration of the resulting posteriors.

The Python API (:mod:`certbnn.api`)::

    post = certbnn.fit(model, (x_train, y_train), method="bbb", likelihood="ibp", eps=0.1)
    report = certbnn.certify(model, post, x_test, y_test, eps=0.1)

Its names are imported on first use, so ``import certbnn`` (and the CLI) stay light.
"""

__version__ = "0.1.0"

from certbnn.errors import CertbnnError
from certbnn.provenance import code_version as _code_version

_code_version()  # the commit of the code as imported: a run records it when it ends, maybe hours later

_API = ("AttackResult", "CertifyReport", "FitResult", "attack", "certify", "fit", "load", "point_mass", "save")

__all__ = [
    "AttackResult",
    "CertbnnError",
    "CertifyReport",
    "FitResult",
    "__version__",
    "attack",
    "certify",
    "fit",
    "load",
    "point_mass",
    "save",
]


def __getattr__(name: str):
    if name in _API:
        from certbnn import api

        return getattr(api, name)
    raise AttributeError(f"module 'certbnn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
