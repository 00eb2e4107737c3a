"""A point mass (one stored weight set: SGD, Adam) is bounded once, not once per draw: every
certificate, the predictive and the validation metrics equal those of the same network stored
as 24 identical samples, which takes the general path that bounds each copy."""

import pytest
import torch
from prototype_net import prototype_net

from certbnn import api
from certbnn.data import ArrayDataset
from certbnn.evaluation.certify import certify_decision, certify_paper, certify_statistical
from certbnn.posterior import SamplePosterior, is_point_mass, mixture_draws
from certbnn.validation import validate

COPIES = 24


@pytest.fixture(scope="module")
def nets():
    """(model, point mass, the same network as 24 identical samples, x, y)."""
    model, mean, _, x, y = prototype_net(3, seed=1, steps=120, std=0.02, test_points=48)
    one = SamplePosterior({n: t.unsqueeze(0) for n, t in mean.items()})
    copies = SamplePosterior({n: t.unsqueeze(0).expand(COPIES, *t.shape).clone() for n, t in mean.items()})
    return model, one, copies, x, y


def test_point_mass_draws_one_set_and_leaves_the_generator_alone(nets):
    _, one, copies, _, _ = nets
    assert is_point_mass(one) and not is_point_mass(copies)
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    drawn = mixture_draws(one, COPIES, gen)
    assert all(t.shape[0] == 1 for t in drawn.values())
    assert torch.equal(gen.get_state(), state)
    assert all(t.shape[0] == COPIES for t in mixture_draws(copies, COPIES, gen).values())
    # the draw never aliases the posterior's storage
    next(iter(drawn.values())).add_(1.0)
    assert not torch.equal(next(iter(drawn.values())), next(iter(one.sample(None).values())))


@pytest.mark.parametrize("eps", [0.02, 0.08])
def test_paper_and_decision_certificates_equal_the_copies(nets, eps):
    model, one, copies, x, y = nets
    for fn in (certify_paper, certify_decision):
        a = fn(model, one, x, y, eps, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        b = fn(model, copies, x, y, eps, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        assert torch.equal(a["certified"], b["certified"]), fn.__name__
        assert a["num_samples"] == b["num_samples"]
        for key in ("sample_fraction", "p_lower", "p_other_upper"):
            if key in a:
                torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12)
    # the eps chosen so that some points are certified and some are not (else the test says little)
    certified = certify_paper(model, one, x, y, 0.08, dtype=torch.float64)["certified"]
    assert eps == 0.02 or 0 < int(certified.sum()) < len(y)


@pytest.mark.parametrize("sequential", [False, True])
def test_statistical_certificate_counts_every_draw(nets, sequential):
    """The binomial test needs the number of draws: a point mass counts its one bound n times."""
    model, one, copies, x, y = nets
    kw = dict(num_samples=300, sequential=sequential, dtype=torch.float64)
    a = certify_statistical(model, one, x, y, 0.05, generator=torch.Generator().manual_seed(0), **kw)
    b = certify_statistical(model, copies, x, y, 0.05, generator=torch.Generator().manual_seed(0), **kw)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key
    assert bool(a["certified"].any())


@pytest.mark.parametrize("certificate", ["per-sample", "paper", "decision", "statistical"])
def test_api_certify_equals_the_copies(nets, certificate):
    model, one, copies, x, y = nets
    kw = dict(certificate=certificate, samples=COPIES, progress=False, chunk_size=16)
    a = api.certify(model, one, x.numpy(), y.numpy(), 0.05, **kw)
    b = api.certify(model, copies, x.numpy(), y.numpy(), 0.05, **kw)
    assert torch.equal(a.certified, b.certified)
    assert a.certified_accuracy == b.certified_accuracy and a.clean_accuracy == b.clean_accuracy


def test_validation_metrics_equal_the_copies(nets):
    model, one, copies, x, y = nets
    data = ArrayDataset(x.numpy().astype("float32"), y.numpy(), 3, "prototypes", "test")
    a = validate(model, one, data, 0.05, num_samples=8)
    b = validate(model, copies, data, 0.05, num_samples=8)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
