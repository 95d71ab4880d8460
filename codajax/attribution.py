"""Post-hoc attribution baselines, as the authors' evaluation computes them.

`attribute(method, model, variables, x, classes, **options)` gives, for images
x (N, H, W, C) in [0, 1] and classes (N, K) (or (K,), or None for all), the
signed attribution per pixel summed over the channels the method attributes
to: (N, K, H, W) float32. Options are keyword arguments; `OPTIONS[method]`
(declared in `codajax.methods`) lists each method's options with their
defaults, which `attribute` passes to the method's function (`_FUNCTIONS`).
The settings are those of the authors' code (github.com/moboehle/CoDA-Nets, interpretability/
explanation_methods):

  ours      `explain.contribution_maps`: the contributions on the encoded
            input [x, 1 - x], 6 channels summed. No autodiff.
  grad      d logit_t / d x on the RGB input, signed, through the dynamic
            weights (not detached), channels summed (captum Saliency, abs=False).
  ixg       x * d logit_t / d x, channels summed (captum InputXGradient).
  intgrad   Integrated Gradients from the zero RGB baseline (captum, n_steps=20):
            x * sum_i w_i grad(a_i x). `steps`=20; `quadrature`="gausslegendre"
            (captum's default: nodes a_i = (1 + u_i) / 2, weights w_i = v_i / 2
            from numpy.polynomial.legendre.leggauss) or "riemann" (captum's
            "riemann_right": a_i = i / n, w_i = 1 / n, i = 1..n; one step is ixg).
  deeplift  ixg. DeepLIFT with a zero baseline is (x - 0) * grad wherever the
            network has no non-linearity its rescale rule treats differently;
            a CoDA-Net has none (the authors' stored DeepLIFT and IxG results
            agree to 1.5e-7).
  gradcam   GradCAM (captum LayerGradCam): ReLU(sum_c mean_hw(dlogit_t/dA_c) A_c),
            upsampled to H x W by torch's "nearest" (src = floor(dst * in / out)).
            `layer`=-1: A = the last layer's output y_L (the class maps), as
            the authors; there dlogit_t/dy_L[..., c] = delta_ct / T, so the map
            is ReLU(y_L[..., t] / T). `layer`=-2: the input of the last layer
            (the successors' variant), -j: the output of layer L - j.
  occ5/occ9 Occlusion with patches of size ks = 5/9 anchored every `stride`=2
            pixels, occluded RGB set to 0: the attribution of a pixel is
            sum over the masks m covering it of (logit(x) - logit(x * m)) / n(m),
            n(m) the number of pixels m occludes. The authors' patch is
            (ks - 1) x (ks - 1), rows [a - (ks-1)/2, a + (ks-1)/2) around the
            anchor a, clipped at the border (the default); `exact_patch`=True
            centres a ks x ks patch on the anchor. All classes come from one sweep.
            (The authors assert H, W divisible by the stride and, for non-square
            images, swap the anchor grids' extents; both agree on square images.)
  rise      RISE (after eclique/RISE): `num_masks`=6000 binary s x s grids
            (`s`=6) with cells on with probability `p`=0.1, bilinearly
            upsampled to (s + 1) * ceil(H / s) as skimage's resize(order=1,
            mode="reflect", anti_aliasing=False) does, then cropped to H x W at
            a random shift in [0, ceil(H / s)); attribution =
            sum_i sigmoid(logit(x * m_i)) m_i / (num_masks * p). The masks come
            from jax.random with `seed`=42 (the authors' were unseeded numpy).
  lime      LIME (lime.LimeImageExplainer): `num_samples`=256 perturbations of
            quickshift superpixels (`kernel_size`=1, `max_dist`=200,
            `ratio`=0.2), classifier = sigmoid(logits); the attribution is the
            binary mask of the `num_features`=3 top positive superpixels
            (get_image_and_mask(positive_only=True, hide_rest=True)); `seed`=42
            seeds the sampling and quickshift. Needs the `lime` extra (`bash launch/setup.sh lime`).

Method names are matched case-insensitively (`canonical_method`: "GradCAM"
is "gradcam"). A class out of [0, num_classes) is a ValueError where the
classes are known; under jax.jit, where they are not, it is clamped and its
map is all NaN, for every method (never zeros, nor another class's map). LIME
runs on the host and is not traceable.

Speed: everything but LIME's superpixels and regressions is one jitted
program. All targets of a batch share one forward (one VJP per target, vmapped);
occlusion masks, RISE masks and integration steps go through the model `chunk`
at a time per image (a scan over chunks, so memory stays bounded). Sharding
follows the input: x placed over a mesh's 'data' axis runs data-parallel.
"""

import functools
import math
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from codajax import batching
from codajax import cli
from codajax import config_lib
from codajax import explain
from codajax import methods
from codajax import models

# The methods and their options with defaults (declared jax-free in
# codajax.methods, read by the config schema: --config.evaluation.options.<method>).
OPTIONS = methods.OPTIONS
METHODS = methods.METHODS


def canonical_method(name: str) -> str:
  """The method `name` as in METHODS, matched case-insensitively ("GradCAM":
  "gradcam"); a ValueError naming the closest spellings otherwise."""
  match, close = config_lib.match_name(name, METHODS, n=2)
  if match:
    return match
  hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
  raise ValueError(f"unknown method {name!r}{hint}; choose one of {METHODS}.")


def attribute(method: str, model: models.CoDANet, variables, x: jax.Array, classes,
              **options) -> jax.Array:
  """The attribution of `classes` (N, K) for images x (N, H, W, C): (N, K, H, W) float32.

  See the module docstring for the methods and their options. `method` is
  matched case-insensitively. Classes out of [0, num_classes) raise a
  ValueError outside jit; under jit their maps are NaN.
  """
  try:
    method = canonical_method(method)
  except ValueError as e:
    raise ValueError(f"attribute: {e}") from None
  unknown = sorted(set(options) - set(OPTIONS[method]))
  if unknown:
    raise ValueError(f"attribute: method {method!r} has no option(s) {unknown}; its options "
                     f"(with defaults) are {OPTIONS[method] or 'none'}.")
  options = {**OPTIONS[method], **options}
  _check_options(method, model, options)
  models.check_input_shape(model, x.shape)
  models.check_input_values(x)
  classes = explain.target_classes(classes, x.shape[0], model.num_classes)
  if method == "lime":
    if models.concrete_values(x) is None or models.concrete_values(classes) is None:
      raise ValueError("attribute: method 'lime' runs on the host (superpixels, "
                       "regressions) and cannot be traced: call it outside jax.jit.")
    return _lime(model, variables, x, classes, **options)
  return _attribute(_FUNCTIONS[method], model, tuple(sorted(options.items())), variables, x,
                    classes)


def _check_options(method, model, options) -> None:
  if method == "intgrad" and options["quadrature"] not in methods.QUADRATURES:
    raise ValueError(f"attribute: quadrature must be one of {methods.QUADRATURES}, got "
                     f"{options['quadrature']!r}.")
  if method == "gradcam" and not -model.num_layers <= options["layer"] <= -1:
    raise ValueError(f"attribute: gradcam's layer must be in [-{model.num_layers}, -1] (-1: the "
                     f"last layer's output, -2: its input), got {options['layer']}.")
  for name in ("steps", "chunk", "stride", "num_masks", "s", "num_samples", "batch_size"):
    if name in options and not int(options[name]) >= 1:
      raise ValueError(f"attribute: option {name} must be >= 1, got {options[name]}.")


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _attribute(fn, model, options, variables, x, given):
  """fn(model, variables, x, classes, **options), one jitted program per method
  function (deeplift shares ixg's). Traced classes may be out of range: every
  method sees them clamped, and their maps become NaN at the end."""
  maps = fn(model, variables, x, explain.clamp_classes(given, model.num_classes), **dict(options))
  return explain.nan_where_out_of_range(maps.astype(jnp.float32), given, model.num_classes)


def _select(maps, classes):
  """(N, num_classes, H, W) -> (N, K, H, W) of the targets."""
  return jnp.take_along_axis(maps, classes[:, :, None, None], axis=1)


# ----------------------------------------------------------------------------
# Gradients: one forward, one VJP per target (vmapped).


def input_gradients(logits_fn, x, classes) -> jax.Array:
  """d logits_fn(x)[n, classes[n, k]] / d x[n]: (N, K, H, W, C)."""
  logits, vjp = jax.vjp(logits_fn, x)
  onehot = jax.nn.one_hot(classes, logits.shape[-1], dtype=logits.dtype)  # (N, K, classes)
  return jax.vmap(lambda g: vjp(g)[0], in_axes=1, out_axes=1)(onehot)


def quadrature_rule(steps: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
  """Nodes a_i in (0, 1] and weights w_i of captum's IntegratedGradients rules."""
  if rule == "riemann":
    return np.arange(1, steps + 1) / steps, np.full(steps, 1.0 / steps)
  u, v = np.polynomial.legendre.leggauss(steps)
  return 0.5 * (1.0 + u), 0.5 * v


def integrated_gradients(logits_fn, x, classes, *, steps, quadrature, chunk) -> jax.Array:
  """x * sum_i w_i grad(a_i x), channels summed: (N, K, H, W); `chunk` steps per
  pass. The options' defaults: OPTIONS["intgrad"]."""
  alphas, weights = (jnp.asarray(a, jnp.float32) for a in quadrature_rule(steps, quadrature))

  def chunk_sum(aw):
    grads = jax.vmap(lambda a: input_gradients(logits_fn, a * x, classes))(aw[0])
    return jnp.einsum("i,inkhwc->nkhwc", aw[1], grads)

  return (x[:, None] * batching.sum_chunks(chunk_sum, (alphas, weights), chunk)).sum(-1)


# ----------------------------------------------------------------------------
# GradCAM.


def gradcam(model, variables, x, classes, *, layer) -> jax.Array:
  """ReLU(sum_c mean_hw(dlogit/dA_c) A_c) on the output of layer L + layer,
  upsampled. The default: OPTIONS["gradcam"]."""
  num_layers = model.num_layers
  inputs, _ = model.apply(variables, x, method=models.CoDANet.layer_inputs)
  start = num_layers + layer + 1      # The first layer applied to the features.
  feats = (inputs[start] if start < num_layers
           else _run_layers(model, variables, inputs[-1], num_layers - 1, pool=False))
  grads = input_gradients(lambda a: _run_layers(model, variables, a, start), feats, classes)
  weights = grads.mean(axis=(2, 3))                                   # (N, K, C)
  cams = jax.nn.relu(jnp.einsum("nkc,nhwc->nkhw", weights, feats.astype(jnp.float32)))
  return upsample_nearest(cams, x.shape[1:3])


def _run_layers(model, variables, h, start: int, pool: bool = True):
  """Layers start.. of the model from their input h, then the pool (logits) or not."""
  def run(module, h):
    for layer in module.layers[start:]:
      h = layer(h)
    return module.pool(h) if pool else h
  return model.apply(variables, h, method=run)


def upsample_nearest(maps, size) -> jax.Array:
  """(..., h, w) -> (..., H, W) as torch's interpolate(mode="nearest"): src = floor(dst*h/H)."""
  rows, cols = (np.minimum(np.floor(np.arange(o) * (i / o)).astype(int), i - 1)
                for i, o in zip(maps.shape[-2:], size))
  return maps[..., rows[:, None], cols[None, :]]


# ----------------------------------------------------------------------------
# Perturbations: occlusion and RISE, every class from one sweep.


def occlusion(logits_fn, x, ks, *, stride, exact_patch, chunk) -> jax.Array:
  """Occlusion attributions of every class: (N, num_classes, H, W).

  Masks are products of a row interval and a column interval (anchors at
  multiples of `stride`, clipped at the border); `chunk` masks per forward.
  The options' defaults: OPTIONS["occ5"] and ["occ9"].
  """
  def intervals(size):
    anchors = np.arange(0, size, stride)
    half = (ks - 1) // 2
    lo, hi = np.maximum(anchors - half, 0), np.minimum(anchors + half + int(exact_patch), size)
    return (np.arange(size) >= lo[:, None]) & (np.arange(size) < hi[:, None])

  rows, cols = intervals(x.shape[1]), intervals(x.shape[2])
  ri, ci = np.divmod(np.arange(len(rows) * len(cols)), len(cols))
  rows, cols = rows[ri].astype(np.float32), cols[ci].astype(np.float32)
  inv_n = 1.0 / (rows.sum(1) * cols.sum(1))
  base = logits_fn(x)

  def chunk_sum(rci):
    r, c, w = rci
    keep = 1.0 - r[:, :, None] * c[:, None, :]                           # (M, H, W)
    diff = base[:, None] - _masked_logits(logits_fn, x, keep)           # (N, M, classes)
    return jnp.einsum("nmk,m,mh,mw->nkhw", diff, w, r, c)

  return batching.sum_chunks(chunk_sum, (rows, cols, inv_n.astype(np.float32)), chunk)


def _masked_logits(logits_fn, x, masks):
  """logits_fn(x[n] * masks[m]) for all n, m: (N, M, classes)."""
  n, m = x.shape[0], masks.shape[0]
  masked = x[:, None] * masks[None, ..., None]
  return logits_fn(masked.reshape(n * m, *x.shape[1:])).reshape(n, m, -1)


def rise(logits_fn, x, *, num_masks, s, p, seed, chunk) -> jax.Array:
  """RISE saliency of every class: (N, num_classes, H, W); `chunk` masks per
  forward. The options' defaults: OPTIONS["rise"]."""
  h, w = x.shape[1:3]
  cell = (math.ceil(h / s), math.ceil(w / s))
  up_rows = jnp.asarray(resize_matrix(s, (s + 1) * cell[0]))
  up_cols = jnp.asarray(resize_matrix(s, (s + 1) * cell[1]))
  key_grid, key_shift = jax.random.split(jax.random.key(seed))
  grids = (jax.random.uniform(key_grid, (num_masks, s, s)) < p).astype(jnp.float32)
  shifts = jax.random.randint(key_shift, (num_masks, 2), 0, jnp.asarray(cell))

  def mask(grid, shift):  # Upsample, then crop: rows of the resize matrices.
    r = jax.lax.dynamic_slice_in_dim(up_rows, shift[0], h)
    c = jax.lax.dynamic_slice_in_dim(up_cols, shift[1], w)
    return r @ grid @ c.T

  def chunk_sum(gs):
    masks = jax.vmap(mask)(*gs)                                          # (M, H, W)
    scores = jax.nn.sigmoid(_masked_logits(logits_fn, x, masks))
    return jnp.einsum("nmk,mhw->nkhw", scores, masks)

  return batching.sum_chunks(chunk_sum, (grids, shifts), chunk) / (num_masks * p)


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in): linear interpolation as skimage's resize(order=1, mode="reflect",
  anti_aliasing=False) along one axis: pixel centres (o + 1/2) n_in / n_out - 1/2,
  mirrored at the edges (scipy's "mirror")."""
  c = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
  c = np.abs(c)
  c = np.where(c > n_in - 1, 2 * (n_in - 1) - c, c)
  lo = np.clip(np.floor(c).astype(int), 0, n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = c - lo
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m.astype(np.float32)


# ----------------------------------------------------------------------------
# The table: each jitted method as fn(model, variables, x, classes, **options)
# -> (N, K, H, W), its options those of `OPTIONS[method]`. LIME runs on the
# host (`_lime`), outside it.


def _logits_fn(model, variables):
  return lambda x: model.apply(variables, x)


def _ours(model, variables, x, classes):
  return explain.contribution_maps(model, variables, x, classes)


def _grad(model, variables, x, classes):
  return input_gradients(_logits_fn(model, variables), x, classes).sum(-1)


def _ixg(model, variables, x, classes):
  return (x[:, None] * input_gradients(_logits_fn(model, variables), x, classes)).sum(-1)


def _intgrad(model, variables, x, classes, **options):
  return integrated_gradients(_logits_fn(model, variables), x, classes, **options)


def _occlusion(model, variables, x, classes, *, ks, **options):
  return _select(occlusion(_logits_fn(model, variables), x, ks=ks, **options), classes)


def _rise(model, variables, x, classes, **options):
  return _select(rise(_logits_fn(model, variables), x, **options), classes)


_FUNCTIONS = {"ours": _ours, "grad": _grad, "ixg": _ixg, "intgrad": _intgrad,
              "deeplift": _ixg, "gradcam": gradcam,
              "occ5": functools.partial(_occlusion, ks=5),
              "occ9": functools.partial(_occlusion, ks=9), "rise": _rise}


# ----------------------------------------------------------------------------
# LIME: superpixels and regressions on the host, the classifier jitted.


def _lime(model, variables, x, classes, num_samples, num_features, kernel_size, max_dist,
          ratio, seed, batch_size) -> jax.Array:
  try:
    from lime import lime_image  # pylint: disable=g-import-not-at-top
    from lime.wrappers.scikit_image import SegmentationAlgorithm  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("attribute: method 'lime' needs the lime and scikit-image packages: "
                      f"{cli.install_hint('lime')}.") from e
  gray = x.shape[-1] == 1  # lime makes grey images RGB (quickshift needs RGB).

  def classifier_fn(images):  # Padded to batch_size: one compile.
    images = np.asarray(images[..., :1] if gray else images, np.float32)
    return batching.map_batches(probabilities, images, batch_size=batch_size).astype(np.float64)

  def probabilities(batch):
    return jax.nn.sigmoid(batching.forward(model, variables, batch))

  maps = np.zeros((*classes.shape, *x.shape[1:3]), np.float32)
  for n, (image, targets) in enumerate(zip(np.asarray(x, np.float64), np.asarray(classes))):
    explainer = lime_image.LimeImageExplainer(random_state=seed, verbose=False)
    segmenter = SegmentationAlgorithm("quickshift", kernel_size=kernel_size,
                                      max_dist=max_dist, ratio=ratio, random_seed=seed)
    # lime 0.2 draws a tqdm bar per image, which would flood --mode evaluate's
    # log (one bar per grid and image); its progress is reported there already.
    with mock.patch.object(lime_image, "tqdm", lambda rows: rows):
      explanation = explainer.explain_instance(
          image[..., 0] if gray else image, classifier_fn, labels=range(model.num_classes),
          top_labels=None, num_samples=num_samples, batch_size=batch_size,
          segmentation_fn=segmenter)
    for k, t in enumerate(targets):
      maps[n, k] = explanation.get_image_and_mask(
          int(t), positive_only=True, num_features=num_features, hide_rest=True)[1]
  return jnp.asarray(maps)
