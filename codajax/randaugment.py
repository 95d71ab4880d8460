"""RandAugment (Cubuk et al. 2020) for tf.data pipelines, stateless and graph-safe.

`randaugment(image, num_layers, magnitude, seed)` applies `num_layers` ops, each
drawn uniformly from `OPS`, at a fixed `magnitude` on the usual 0..30 scale
(ImageNet setting in the paper: n=2, m=10). Images are float32 (H, W, 3) in
[0, 1]; the result has the same shape, dtype and range. All randomness (op
choice, signs) comes from `seed`, a shape-(2,) int32/int64 tensor fed to
`tf.random.stateless_*`, so the same seed gives bit-identical output (needed for
resumable training), and everything is plain TF ops that trace in
`tf.data.Dataset.map`. No TF-addons: geometric ops use
`tf.raw_ops.ImageProjectiveTransformV3` (bilinear, fill 0.5 grey).

Magnitudes follow timm/torchvision, each signed op getting a random sign:
  Rotate +-30 deg * m/30, ShearX/Y +-0.3 * m/30, TranslateX/Y +-0.45 * m/30 of
  the image size; Brightness/Color/Contrast/Sharpness factor 1 +- 0.9 * m/30
  (PIL ImageEnhance blends); Solarize inverts pixels > 1 - m/30; Posterize keeps
  8 - floor(4 * m/30) bits.
At m=0 every op is the identity except AutoContrast and Equalize (which ignore
m) and Posterize (8-bit quantisation, error <= 1/510). `OPS` maps name ->
fn(image, magnitude, seed) so ops can be called and tested one by one.
"""

import math

import tensorflow as tf

MAX_LEVEL = 30.0
FILL_VALUE = 0.5


def _signed(value, seed):
  """`value` times a random sign drawn statelessly from `seed`."""
  coin = tf.random.stateless_uniform([], seed=seed)
  return tf.where(coin < 0.5, -value, value)


def _level(magnitude):
  return tf.cast(magnitude, tf.float32) / MAX_LEVEL


def _blend(image, degenerate, factor):
  """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped."""
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 1.0)


def _to_uint8_levels(image):
  return tf.cast(tf.round(image * 255.0), tf.int32)


def transform(image, matrix):
  """Projective warp; `matrix` = [a0,a1,a2,b0,b1,b2,c0,c1] maps output->input."""
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.cast(tf.reshape(matrix, [1, 8]), tf.float32),
      output_shape=tf.shape(image)[:2], fill_value=tf.constant(FILL_VALUE, tf.float32),
      interpolation="BILINEAR", fill_mode="CONSTANT")
  return tf.ensure_shape(out[0], image.shape)


def rotate(image, degrees):
  """Rotates counter-clockwise by `degrees` about the centre (like PIL/np.rot90)."""
  theta = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  cos, sin = tf.cos(theta), tf.sin(theta)
  hw = tf.cast(tf.shape(image)[:2], tf.float32) - 1.0
  h, w = hw[0], hw[1]
  x_off = (w - (cos * w - sin * h)) / 2.0
  y_off = (h - (sin * w + cos * h)) / 2.0
  return transform(image, tf.stack([cos, -sin, x_off, sin, cos, y_off, 0.0, 0.0]))


def _identity(image, magnitude, seed):
  del magnitude, seed
  return image


def _auto_contrast(image, magnitude, seed):
  """Per channel, rescales [min, max] to [0, 1]; constant channels unchanged."""
  del magnitude, seed
  lo = tf.reduce_min(image, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(image, axis=[0, 1], keepdims=True)
  scaled = (image - lo) / tf.maximum(hi - lo, 1e-8)
  return tf.clip_by_value(tf.where(hi > lo, scaled, image), 0.0, 1.0)


def _equalize_channel(q):
  """PIL ImageOps.equalize on one int32 channel of 8-bit levels."""
  hist = tf.histogram_fixed_width(q, [0, 255], nbins=256)
  last_nonzero = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
  step = (tf.reduce_sum(hist) - last_nonzero) // 255
  safe = tf.maximum(step, 1)
  lut = tf.concat([[0], ((tf.cumsum(hist) + safe // 2) // safe)[:-1]], 0)
  return tf.where(step == 0, q, tf.gather(tf.clip_by_value(lut, 0, 255), q))


def _equalize(image, magnitude, seed):
  del magnitude, seed
  q = _to_uint8_levels(image)
  out = tf.stack([_equalize_channel(q[..., c]) for c in range(3)], axis=-1)
  return tf.cast(out, tf.float32) / 255.0


def _rotate(image, magnitude, seed):
  return rotate(image, _signed(30.0 * _level(magnitude), seed))


def _solarize(image, magnitude, seed):
  del seed
  return tf.where(image > 1.0 - _level(magnitude), 1.0 - image, image)


def _color(image, magnitude, seed):
  gray = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))
  return _blend(image, gray, 1.0 + _signed(0.9 * _level(magnitude), seed))


def _posterize(image, magnitude, seed):
  del seed
  bits = 8.0 - tf.floor(4.0 * _level(magnitude))
  step = tf.pow(2.0, 8.0 - bits)
  q = tf.cast(_to_uint8_levels(image), tf.float32)
  return tf.floor(q / step) * step / 255.0


def _contrast(image, magnitude, seed):
  mean = tf.reduce_mean(tf.image.rgb_to_grayscale(image))
  return _blend(image, mean, 1.0 + _signed(0.9 * _level(magnitude), seed))


def _brightness(image, magnitude, seed):
  return _blend(image, 0.0, 1.0 + _signed(0.9 * _level(magnitude), seed))


def _sharpness(image, magnitude, seed):
  """PIL SHARPEN-style: blend with a 3x3 smoothed copy (border pixels kept)."""
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  pad = [[1, 1], [1, 1], [0, 0]]
  mask = tf.pad(tf.ones_like(smooth), pad)
  degenerate = mask * tf.pad(smooth, pad) + (1.0 - mask) * image
  return _blend(image, degenerate, 1.0 + _signed(0.9 * _level(magnitude), seed))


def _shear_x(image, magnitude, seed):
  s = _signed(0.3 * _level(magnitude), seed)
  return transform(image, tf.stack([1.0, s, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def _shear_y(image, magnitude, seed):
  s = _signed(0.3 * _level(magnitude), seed)
  return transform(image, tf.stack([1.0, 0.0, 0.0, s, 1.0, 0.0, 0.0, 0.0]))


def _translate(image, magnitude, seed, axis):
  size = tf.cast(tf.shape(image)[1 - axis], tf.float32)  # axis 0: x (width)
  t = _signed(0.45 * _level(magnitude), seed) * size
  dx, dy = (t, 0.0) if axis == 0 else (0.0, t)
  return transform(image, tf.stack([1.0, 0.0, dx, 0.0, 1.0, dy, 0.0, 0.0]))


OPS = {
    "Identity": _identity,
    "AutoContrast": _auto_contrast,
    "Equalize": _equalize,
    "Rotate": _rotate,
    "Solarize": _solarize,
    "Color": _color,
    "Posterize": _posterize,
    "Contrast": _contrast,
    "Brightness": _brightness,
    "Sharpness": _sharpness,
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": lambda image, m, seed: _translate(image, m, seed, axis=0),
    "TranslateY": lambda image, m, seed: _translate(image, m, seed, axis=1),
}
# Ops other than the identity at magnitude 0, by definition.
NOT_IDENTITY_AT_ZERO = ("AutoContrast", "Equalize", "Posterize")


def randaugment(image, num_layers: int, magnitude: float, seed):
  """Applies `num_layers` uniformly chosen ops from `OPS` at `magnitude` (0..30).

  `seed` is a shape-(2,) int32/int64 tensor; equal seed values give identical
  output whatever the dtype (stateless_split's stream depends on the seed dtype,
  so the seed is cast to int64 first).
  """
  image = tf.convert_to_tensor(image, tf.float32)
  branches = list(OPS.values())
  seed = tf.cast(seed, tf.int64)
  seeds = tf.random.experimental.stateless_split(seed, num=2 * num_layers)
  for i in range(num_layers):
    op_seed = seeds[2 * i + 1]
    index = tf.random.stateless_uniform(
        [], seed=seeds[2 * i], minval=0, maxval=len(branches), dtype=tf.int32)
    image = tf.switch_case(index, [
        (lambda fn=fn, x=image: tf.ensure_shape(fn(x, magnitude, op_seed), x.shape))
        for fn in branches])
  return tf.clip_by_value(image, 0.0, 1.0)
