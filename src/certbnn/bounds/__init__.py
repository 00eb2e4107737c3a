"""Sound output bounds of neural networks over input boxes (and weight boxes).

Public API
----------
``compute_bounds(model, lower, upper, method="ibp", params=None, param_bounds=None, spec=None,
*, dtype=None, tol=None, intersect_ibp=True, input_has_samples=None, sample_chunk=None) -> (lower, upper)``
    Bounds of ``model(x)`` -- or of ``spec @ model(x)`` -- valid for every ``x``
    with ``lower <= x <= upper`` (and every weight in ``param_bounds``).

    * ``model``: the engine bounds exactly the function ``model(x)`` computes,
      or raises :class:`~certbnn.errors.UnsupportedLayerError` (one line: the
      module's qualified name, type and the reason). Accepted: a registered
      layer, or an ``nn.Sequential`` (nested, subclasses that keep
      ``Sequential.forward``) of them, walked as ``Sequential.forward`` runs
      it -- a module instance used twice is bounded at each use, and its
      tensors are named (in ``params``/``param_bounds``) by their first name
      in ``named_parameters()``. Refused: subclasses overriding ``forward`` of a
      registered type (unless they register their own rule), a replaced
      instance ``forward`` of a layer, forward hooks (module or global),
      parametrizations, and configurations a rule does not implement (Dropout
      with ``p > 0`` or BatchNorm in training mode, ...); see
      :mod:`certbnn.bounds.structure`. Any other module (custom ``forward`` code:
      residual sums, functional activations, concatenations, reshapes, constants, means)
      is traced with ``torch.fx`` into a DAG and bounded by the graph engine
      (:mod:`certbnn.bounds.graph`), or refused in one line naming the operation.
    * ``lower``/``upper``: ``(B, *in)``. With sampled params an input of
      ``(S, B, *in)`` is also accepted (auto-detected from the rank the first
      shape-fixing layer expects -- Linear 1, Conv2d/pools 3 -- or forced with
      ``input_has_samples``).
    * ``params``: name -> tensor replacing module parameters/buffers (names of
      ``model.named_parameters()``/``named_buffers()``); a tensor with one extra
      leading dim ``S`` is ``S`` posterior samples: all ``S`` are bounded in one
      batched pass and the outputs gain a leading ``S``.
    * ``param_bounds``: name -> ``(low, high)`` weight intervals (optionally with
      a leading ``S``); sound over the whole weight box. IBP only: the CROWN
      methods fall back to IBP with a :class:`BoundsFallbackWarning`.
    * ``method``: ``"ibp"`` (interval, midpoint-radius), ``"crown"`` (backward
      linear relaxation, intermediate bounds by CROWN intersected with IBP;
      memory ``O(neurons x input size)`` per layer, meant for small nets),
      ``"crown-ibp"`` (IBP intermediate bounds, CROWN at the output).
    * ``spec``: ``(K_spec, K)`` or ``(B, K_spec, K)``; IBP folds it into the last
      Linear layer, CROWN starts its backward pass from it (see :func:`margin_spec`).
    * ``dtype``: compute in this dtype (e.g. ``torch.float64`` to certify); by
      default the input box's dtype; parameters are cast to it.
    * ``tol``: floating-point policy. ``None`` (default, for training): plain
      rounding to nearest, no widening. ``"sound"``: rigorous in floating point
      (float32 or float64; certificates use it, in float64 by default): the
      box and weight boxes are cast outward, centre/radius rounded outward,
      every layer adds an a-priori bound on its rounding error (Higham's
      ``gamma_n`` for dot products of length ``n``, in any summation order) and
      rounds its results outward, CROWN adds the rounding error of every
      back-substitution step and uses relaxation lines valid for their float
      coefficients; TF32/cuDNN are switched off for the call. Assumes IEEE
      round-to-nearest, no fast-math, and ``tanh``/``sigmoid`` within
      ``LIBM_ULPS`` ulps (see docs/bounds.md, "Floating point"). Layers
      without such rules (BatchNorm, LeakyReLU, user rules without ``*_sound``
      methods) are refused with :class:`~certbnn.errors.UnsupportedLayerError`.
      ``"auto"`` (explicitly NOT rigorous): widen by the empirical per-dtype
      ``AUTO_TOL``; a float or ``(rtol, atol)``: widen by ``atol + rtol*|bound|``.
    * ``intersect_ibp``: CROWN methods return the elementwise intersection with
      the IBP bounds (so they are never looser than IBP). Default True.
    * ``sample_chunk``: samples per batched pass; default all of them on GPU
      and a cache-sized chunk on CPU (faster there); results do not depend on it.

    Output: ``([S,] B, *out)``, or ``([S,] B, K_spec)`` with a spec.

``margin_spec(labels, num_classes, *, exclude_true=False) -> Tensor``
    ``(B, K, K)`` (or ``(B, K-1, K)``) rows ``e_y - e_j`` for margin bounds.
``worst_case_logits(lower, upper, labels) -> Tensor``
    ``upper`` everywhere except ``lower`` at the true label.
``interval_forward(model, lower, upper, params=None, param_bounds=None, *, dtype=None,
input_has_samples=None) -> list[(name, lower, upper)]``
    IBP bounds of every layer's output.
``widen(lower, upper, rtol, atol)``, ``AUTO_TOL``
    The (non-rigorous) tolerance widening used by a numeric ``tol`` / ``"auto"``.
``register_bound(module_type, bound_class=None)``, ``BoundOp``
    Register the bound rules (a :class:`BoundOp` subclass) of a module type.
``check_soundness(...)``
    Sampling-based soundness checker (for tests of user-registered rules).

Guarantee: in exact arithmetic every returned bound is sound; with
``tol="sound"`` it is also sound for the floating-point computation (the bound
encloses the exact real-arithmetic output of the network with the given float
weights), under the assumptions above. Without it, rounding can move a bound by
ulps of the magnitudes summed (unboundedly many ulps of the bound itself).
Everything is differentiable with respect to the box, ``params`` and the
module parameters.
"""

from certbnn.bounds.base import BoundOp, ElementwiseOp, LinearOp
from certbnn.bounds.checking import SoundnessReport, check_soundness
from certbnn.bounds.engine import BoundsFallbackWarning, compute_bounds, interval_forward
from certbnn.bounds.registry import register_bound
from certbnn.bounds.specs import AUTO_TOL, margin_spec, widen, worst_case_logits

__all__ = [
    "AUTO_TOL",
    "BoundOp",
    "BoundsFallbackWarning",
    "ElementwiseOp",
    "LinearOp",
    "SoundnessReport",
    "check_soundness",
    "compute_bounds",
    "interval_forward",
    "margin_spec",
    "register_bound",
    "widen",
    "worst_case_logits",
]
