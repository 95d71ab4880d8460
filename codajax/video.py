"""Video explanations: every frame of a video beside its contribution map.

The paper's videos (the authors' `interpretability/eval_on_video.py`) explain
a clip frame by frame for one class: the class the network predicts most often
over the frames unless one is given (their class_idx = -1, here None). Each
frame goes through the test transform (short side resized, centre crop), its
layer-0 contributions are summed over channels, clipped to +-max_value and
coloured with matplotlib's `bwr` (white at 0, red for evidence for the class,
blue against it), and the frame is written on the left of its map.

  frames = video.read_video("clip.mp4")
  out = video.explain_video(model, variables, frames, "clip_atts.mp4", image_size=224)

Two choices differ from the authors' script, both visible in the arguments:
  * The colour limit. The authors clip at a fixed MAXV = 0.011118167620152223,
    the 99.75th percentile of |contribution| over the most confident images
    of 50 ImageNet classes for their 9L-L model (`AUTHORS_MAXV`; pass it as
    `max_value` to reproduce their colours with that model). Any other model,
    temperature or data set has its own scale, so by default the limit is one
    high percentile of |maps| over all the frames of the video: shared, so
    that a colour means the same contribution in every frame.
  * The file. GIF (Pillow) or MP4 (libx264 through the ffmpeg binary that
    imageio-ffmpeg ships) instead of OpenCV's mp4v, which browsers and
    notebooks do not play. Writing needs the `video` extra (`bash launch/setup.sh video`).

The explanations themselves are `codajax.explain` (no autodiff); this module
only batches them over frames (`codajax.batching`) and turns them into pictures.

A file that cannot be read as a video (empty, text, truncated, no frames) is
a `VideoError` (a ValueError): one line naming the file and what was expected.
"""

import contextlib
import functools
import os
import pathlib
from typing import Optional
import warnings

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from codajax import batching
from codajax import cli
from codajax import explain
from codajax import models
from codajax import plotting
from codajax import workdir as workdir_lib

# The authors' clipping value (interpretability/configs.py, MAXV), for their
# 9L-L ImageNet model: "99.75th percentile over the most confident examples
# for 50 classes".
AUTHORS_MAXV = 0.011118167620152223
# The default colour limit: this percentile of |maps| over all frames.
PERCENTILE = 99.75
VIDEO_EXTRA = cli.install_hint("video")
SUFFIXES = (".gif", ".mp4")
FFMPEG_INVALID = "Invalid data found when processing input"  # ffmpeg's AVERROR_INVALIDDATA.


class VideoError(ValueError):
  """A file that is not a readable video: one line naming it and what was expected."""

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split()))


# ------------------------------------------------------------------ frames in


def prepare_frames(frames, image_size: int, resize_size: Optional[int] = None) -> np.ndarray:
  """The test transform of every frame: float32 (T, S, S, C) in [0, 1], S = image_size.

  frames: (T, H, W, C), uint8 (0..255) or floats in [0, 1]. The short side is
  resized (bilinear, antialiased) to `resize_size` (default `image_size`),
  then the centre S x S is cropped, as `input_pipeline.preprocess` does for
  ImageNet test images. Runs in chunks of frames so that a long high
  resolution clip is never held in float32 at full size.
  """
  frames = _check_frames(frames)
  resize_size = image_size if resize_size is None else resize_size
  if not 0 < image_size <= resize_size:
    raise ValueError(f"prepare_frames: need 0 < image_size <= resize_size, got "
                     f"image_size={image_size}, resize_size={resize_size}.")
  t, h, w, _ = frames.shape
  scale = resize_size / min(h, w)
  # As input_pipeline._resize_short: round, and never below resize_size.
  new = (max(round(h * scale), resize_size), max(round(w * scale), resize_size))
  top, left = (new[0] - image_size) // 2, (new[1] - image_size) // 2
  fn = functools.partial(_resize_crop, new=new, crop=(top, left, image_size))
  return batching.map_batches(fn, frames, batch_size=min(t, 8))


@functools.partial(jax.jit, static_argnames=("new", "crop"))
def _resize_crop(x, new, crop):
  top, left, size = crop
  x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  if x.shape[1:3] != new:
    x = jax.image.resize(x, (x.shape[0], *new, x.shape[3]), "bilinear", antialias=True)
  return jnp.clip(x[:, top:top + size, left:left + size], 0.0, 1.0)


def _check_frames(frames) -> np.ndarray:
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[0] == 0:
    raise ValueError(f"Expected frames of shape (T, H, W, C) with T >= 1; got shape "
                     f"{frames.shape}. Add a channel axis with frames[..., None] for "
                     "grayscale, or a time axis with frame[None] for one image.")
  if frames.dtype == np.uint8:
    return frames
  if not np.issubdtype(frames.dtype, np.floating):
    raise ValueError(f"Expected uint8 frames (0..255) or floats in [0, 1]; got dtype "
                     f"{frames.dtype}. Convert with frames.astype(np.uint8).")
  if frames.min() < 0 or frames.max() > 1:
    raise ValueError(f"Float frames must be in [0, 1]; got {frames.min()}..{frames.max()}. "
                     "Divide 0..255 frames by 255.")
  return frames


# --------------------------------------------------------------- explanations


def _maps_and_logits(model, variables, x, class_idx):
  """(N, H, W) contribution maps of class `class_idx` (a traced int32, so that
  another class does not recompile) and the (N, K) logits."""
  e = explain.explain(model, variables, x, class_idx[None])
  return e.contributions[:, 0].sum(axis=-1), e.logits


# Module level, so that its compilations are kept across calls and videos.
_explain_chunk = jax.jit(_maps_and_logits, static_argnums=0)


def most_predicted(logits) -> int:
  """The class predicted for most frames; ties go to the lowest index."""
  logits = np.asarray(logits)
  return int(np.bincount(logits.argmax(-1), minlength=logits.shape[-1]).argmax())


def explain_frames(model: models.CoDANet, variables, frames, class_idx: Optional[int] = None,
                   batch_size: int = 16):
  """Per frame, the contribution map of one class: (maps, logits, class_idx).

  maps: float32 (T, H, W), `explain.contribution_maps` of `class_idx`;
  logits: (T, num_classes); class_idx: the class explained, an int.

  frames: float (T, H, W, C) in [0, 1], e.g. from `prepare_frames`.
  class_idx: None for the class predicted for most frames (ties: the lowest
  index), the authors' -1; that costs one forward pass over the clip first.
  The frames go through one jitted function in chunks of
  min(batch_size, T); the last chunk is padded, so a clip compiles once.
  """
  frames = _check_frames(frames)
  if frames.dtype == np.uint8:
    raise ValueError("explain_frames expects frames prepared as floats in [0, 1]; got "
                     "uint8. Use prepare_frames(frames, image_size) first.")
  frames = frames.astype(np.float32)
  models.check_input_shape(model, frames.shape)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  chunk = min(batch_size, len(frames))
  if class_idx is None:
    logits = batching.map_batches(functools.partial(batching.forward, model, variables),
                                  frames, batch_size=chunk)
    class_idx = most_predicted(logits)
  class_idx = _check_class(class_idx, model.num_classes)
  fn = functools.partial(_explain_chunk, model, variables, class_idx=jnp.int32(class_idx))
  maps, logits = batching.map_batches(fn, frames, batch_size=chunk)
  return maps.astype(np.float32), logits, class_idx


def _check_class(class_idx, num_classes: int) -> int:
  if isinstance(class_idx, bool) or not isinstance(class_idx, (int, np.integer)):
    raise ValueError(f"class_idx must be an int or None, got {class_idx!r}.")
  if not 0 <= class_idx < num_classes:
    raise ValueError(f"class_idx must be in [0, {num_classes - 1}], got {class_idx}; use "
                     "None for the class predicted most often (the authors' -1).")
  return int(class_idx)


# ----------------------------------------------------------------- pictures


def map_to_rgb(maps, max_value: Optional[float] = None) -> np.ndarray:
  """Contribution maps (T, H, W) as uint8 RGB (T, H, W, 3) in `bwr`, white at 0.

  Values are clipped to [-max_value, max_value]. max_value=None takes the
  `PERCENTILE`th percentile of |maps| over all frames together: one limit for
  the whole clip, so a colour is the same contribution in every frame (a
  limit per frame would make a weak frame look as confident as a strong one).
  Pass `AUTHORS_MAXV` for the authors' fixed limit (their 9L-L model).
  """
  maps = np.asarray(maps, np.float32)
  if maps.ndim != 3:
    raise ValueError(f"map_to_rgb expects maps of shape (T, H, W); got {maps.shape}.")
  max_value = default_max_value(maps) if max_value is None else max_value
  if not max_value > 0:
    raise ValueError(f"max_value must be > 0, got {max_value}.")
  # As the authors' att2img: (clip(m / MAXV, -1, 1) + 1) / 2 into bwr.
  scaled = (np.clip(maps / max_value, -1.0, 1.0) + 1.0) / 2.0
  return matplotlib.colormaps["bwr"](scaled, bytes=True)[..., :3]


def default_max_value(maps) -> float:
  """The `PERCENTILE`th percentile of |maps| over all frames together."""
  maps = np.asarray(maps, np.float32)
  return float(plotting.map_limits(maps.reshape(1, -1), percentile=PERCENTILE)[0])


def to_uint8(frames) -> np.ndarray:
  """Frames as uint8 RGB: floats in [0, 1] scaled and rounded, one channel repeated."""
  frames = np.asarray(frames)
  if frames.dtype != np.uint8:
    frames = np.round(np.clip(frames.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)
  if frames.shape[-1] == 1:
    frames = np.repeat(frames, 3, axis=-1)
  return frames[..., :3]


def side_by_side(frames, maps_rgb) -> np.ndarray:
  """uint8 (T, H, 2W, 3): each frame (uint8, or float in [0, 1]) left of its map."""
  frames, maps_rgb = to_uint8(frames), np.asarray(maps_rgb)
  if frames.shape[:3] != maps_rgb.shape[:3] or maps_rgb.shape[-1] != 3:
    raise ValueError(f"side_by_side: frames {frames.shape} and maps {maps_rgb.shape} must "
                     "have the same (T, H, W), the maps 3 channels (map_to_rgb).")
  return np.concatenate([frames, maps_rgb.astype(np.uint8)], axis=2)


# ------------------------------------------------------------------ files


def write_video(path, frames_uint8, fps: float = 10.0) -> str:
  """Writes frames (T, H, W, 3) uint8 to `path`, a .gif or .mp4; returns the path.

  Atomic: written to a temporary file beside `path`, then renamed over it, so
  a failure leaves neither a partial file nor a changed old one.
  GIF: through Pillow, a palette of 256 colours per frame; Pillow merges
  identical consecutive frames (adding up their durations), so reading back
  may give fewer frames. MP4: H.264 in yuv420p, which needs even sizes: an
  odd height or width is padded by one row or column repeating the edge.
  """
  path = os.fspath(path)
  suffix = pathlib.Path(path).suffix.lower()
  if suffix not in SUFFIXES:
    raise ValueError(f"write_video: unknown file type {suffix or '(none)'!r} in {path!r}; "
                     f"use one of {SUFFIXES}.")
  frames = np.asarray(frames_uint8)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
    raise ValueError(f"write_video expects uint8 frames (T, H, W, 3), T >= 1; got "
                     f"{frames.dtype} {frames.shape}. Use to_uint8 or side_by_side.")
  if not fps > 0:
    raise ValueError(f"fps must be > 0, got {fps}.")
  write = _write_gif if suffix == ".gif" else _write_mp4
  write_module = _import_video_libs(suffix)  # Before any file is created.
  with workdir_lib.atomic_path(path) as tmp:  # Keeps the suffix, for ffmpeg.
    write(write_module, tmp, frames, float(fps))
  return path


def _import_video_libs(suffix: str):
  """imageio.v3 (GIF) or imageio_ffmpeg (MP4), with the fix when missing."""
  try:
    if suffix == ".gif":
      import imageio.v3 as module  # pylint: disable=g-import-not-at-top
    else:
      import imageio_ffmpeg as module  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"Writing {suffix} videos needs imageio and imageio-ffmpeg: "
                      f"{VIDEO_EXTRA} ({e}).") from e
  return module


def _write_gif(iio, path: str, frames: np.ndarray, fps: float) -> None:
  # GIF stores durations in 10 ms units; loop=0 plays forever.
  iio.imwrite(path, frames, extension=".gif", plugin="pillow",
              duration=1000.0 / fps, loop=0)


def _write_mp4(imageio_ffmpeg, path: str, frames: np.ndarray, fps: float) -> None:
  frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2),
                           (0, 0)), mode="edge")
  # quality 8 is crf 10: near lossless for the flat colours of the maps.
  writer = imageio_ffmpeg.write_frames(
      path, (frames.shape[2], frames.shape[1]), fps=fps, codec="libx264",
      pix_fmt_out="yuv420p", quality=8, macro_block_size=1, ffmpeg_log_level="error")
  with _spawning_ffmpeg():
    writer.send(None)  # Starts ffmpeg.
  try:
    for frame in frames:
      writer.send(np.ascontiguousarray(frame))
  finally:
    writer.close()


@contextlib.contextmanager
def _spawning_ffmpeg():
  """Silences JAX's warning that os.fork() is unsafe in a multithreaded
  process: subprocess execs ffmpeg right after the fork, which is safe."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", r"os\.fork\(\) was called", RuntimeWarning)
    yield


def read_video(path) -> np.ndarray:
  """All frames of a video or GIF (anything imageio reads) as uint8 (T, H, W, 3).

  Raises FileNotFoundError for a missing file, and VideoError for one that
  Pillow (GIF) or ffmpeg (anything else) cannot read or that has no frames.
  """
  path = os.fspath(path)
  gif = path.lower().endswith(".gif")
  try:
    iio = _import_video_libs(".gif")
    if not gif:
      _import_video_libs(".mp4")  # imageio would only say that no plugin can read it.
  except ImportError as e:
    raise ImportError(f"Reading videos needs imageio and imageio-ffmpeg: {VIDEO_EXTRA}.") from e
  # Frame by frame: a stack of a whole clip is ambiguous ((T, H, W) grey or
  # (H, W, 3) one image); GIF frames are asked for in RGB, as they may switch
  # palettes and modes.
  kwargs = {"plugin": "pillow", "mode": "RGB"} if gif else {}
  expected = ("a GIF file with at least one frame" if gif else
              "a video file that ffmpeg decodes (e.g. MP4) with at least one frame")
  try:
    with _spawning_ffmpeg():
      frames = [np.asarray(f) for f in iio.imiter(path, **kwargs)]
  except FileNotFoundError:
    raise
  except (OSError, RuntimeError, ValueError, IndexError, EOFError, SyntaxError) as e:
    # Pillow and ffmpeg name neither the file nor the fix, and ffmpeg adds its
    # banner: not chained into the traceback (still there as __context__).
    raise VideoError(f"{path} is not a readable video ({_read_failure(e, path, gif)}); expected "
                     f"{expected}.") from None
  if not frames:
    raise VideoError(f"{path} has no frames; expected {expected}.")
  return np.stack([_rgb(f) for f in frames])


def _read_failure(e: BaseException, path: str, gif: bool) -> str:
  """The gist of a reader's error: ffmpeg's verdict (after its banner, among
  its log lines), else the error's last line, with the reader's name."""
  text, reader = str(e.__cause__ or e), "Pillow" if gif else "ffmpeg"
  if not gif and FFMPEG_INVALID in text:
    return f"ffmpeg: {FFMPEG_INVALID.lower()}"
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  gist = lines[-1].rstrip(".").replace(path, "it") if lines else type(e).__name__
  return gist if gist.startswith(reader) else f"{reader}: {gist}"


def _rgb(frame: np.ndarray) -> np.ndarray:
  if frame.ndim == 2:
    frame = frame[..., None]
  if frame.dtype != np.uint8:
    raise ValueError(f"read_video: frames of dtype {frame.dtype} are not supported (uint8 only).")
  return np.repeat(frame, 3, axis=-1) if frame.shape[-1] == 1 else frame[..., :3]


# --------------------------------------------------------------- all in one


def explain_video(model: models.CoDANet, variables, frames, path, *,
                  image_size: Optional[int] = None, class_idx: Optional[int] = None,
                  fps: float = 10.0, batch_size: int = 16,
                  max_value: Optional[float] = None) -> dict:
  """Explains a clip and writes it (frame left, map right) to `path` (.gif/.mp4).

  frames: (T, H, W, C) uint8 or floats in [0, 1], or a path for `read_video`
  (VideoError if it is not a readable video; nothing is written then).
  image_size: the model's input size (short side resized to it, then centre
  crop); None keeps the frames' scale and crops the centre square.
  class_idx, batch_size: as `explain_frames`; max_value: as `map_to_rgb`.
  Returns dict(path, class_idx, maps (T, S, S), logits (T, K), max_value).
  """
  if isinstance(frames, (str, os.PathLike)):
    frames = read_video(frames)
  frames = _check_frames(frames)
  size = min(frames.shape[1:3]) if image_size is None else image_size
  x = prepare_frames(frames, size)
  maps, logits, class_idx = explain_frames(model, variables, x, class_idx, batch_size)
  max_value = default_max_value(maps) if max_value is None else max_value
  path = write_video(path, side_by_side(x, map_to_rgb(maps, max_value)), fps)
  return dict(path=path, class_idx=class_idx, maps=maps, logits=logits, max_value=max_value)
