"""Posteriors as data, kept apart from the model.

A posterior maps the names of ``dict(model.named_parameters())`` to tensors and is
applied with ``torch.func.functional_call``. ``posterior.sample(n)`` returns ONE
stacked dict ``name -> (n, *param_shape)``, ready for ``torch.vmap`` over the
leading sample dim or for the bound engine's batched-weights path::

    params = posterior.sample(8)
    logits = torch.vmap(lambda p: torch.func.functional_call(model, p, (x,)))(params)  # (8, B, K)
"""

from certbnn.posterior.gaussian import GaussianPosterior, box_log_mass
from certbnn.posterior.paramdict import ParamDict
from certbnn.posterior.samples import SamplePosterior, is_point_mass, mixture_draws
from certbnn.posterior.storage import FORMAT_VERSION, Posterior, PosteriorFileError, load_posterior, save_posterior

__all__ = [
    "FORMAT_VERSION",
    "GaussianPosterior",
    "ParamDict",
    "Posterior",
    "PosteriorFileError",
    "SamplePosterior",
    "box_log_mass",
    "is_point_mass",
    "load_posterior",
    "mixture_draws",
    "save_posterior",
]
