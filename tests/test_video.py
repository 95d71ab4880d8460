"""Tests for codajax.video: maps equal explain's, majority class, colours, files.

The maps are checked against `explain.contribution_maps` on the whole clip at
once, so batching, padding and the jitted class argument must not change
them. Files are written and read back through imageio (GIF and MP4).
"""

import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codajax import explain
from codajax import models
from codajax import video

SIZE = 16


@pytest.fixture(scope="module")
def net():
  model = models.tiny()
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
  # b is initialised to 0; make it not, so that the maps depend on every parameter.
  variables = jax.tree.map(
      lambda l: l + 0.05 * jax.random.normal(jax.random.key(1), l.shape), variables)
  return model, variables


def clip(t, h=SIZE, w=SIZE, seed=0, noise=20.0):
  """Distinct uint8 frames (T, H, W, 3): a moving colour gradient plus noise."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([xx * 255 / w, yy * 255 / h, np.full_like(xx, 128.0)], -1)
  frames = [np.roll(base, 3 * i, axis=1) + rng.normal(0, noise, base.shape) for i in range(t)]
  return np.clip(np.round(frames), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- frames in


def test_prepare_frames_shapes_and_range():
  frames = clip(3, 20, 30)
  x = video.prepare_frames(frames, SIZE)
  chex.assert_shape(x, (3, SIZE, SIZE, 3))
  assert x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
  # Floats in [0, 1] give what uint8 gives; resize_size > image_size crops more.
  np.testing.assert_allclose(video.prepare_frames(frames / 255.0, SIZE), x, atol=1e-6)
  chex.assert_shape(video.prepare_frames(frames, 12, resize_size=16), (3, 12, 12, 3))


def test_prepare_frames_without_scaling_is_the_centre_crop():
  frames = clip(2, SIZE, 24)
  np.testing.assert_allclose(video.prepare_frames(frames, SIZE),
                             frames[:, :, 4:20] / 255.0, atol=1e-6)


def test_prepare_frames_refuses_bad_frames():
  with pytest.raises(ValueError, match="Divide"):
    video.prepare_frames(np.full((1, 8, 8, 3), 2.0), 8)
  with pytest.raises(ValueError, match="shape"):
    video.prepare_frames(np.zeros((8, 8, 3), np.uint8), 8)


# --------------------------------------------------------------- explanations


def test_maps_equal_contribution_maps_and_compile_once(net, monkeypatch):
  model, variables = net
  chex.clear_trace_counter()
  monkeypatch.setattr(video, "_explain_chunk", jax.jit(
      chex.assert_max_traces(video._maps_and_logits, n=1), static_argnums=0))
  frames = video.prepare_frames(clip(7), SIZE)
  # 7 frames in chunks of 3: the last chunk is padded by two frames.
  maps, logits, c = video.explain_frames(model, variables, frames, class_idx=3, batch_size=3)
  assert c == 3
  chex.assert_shape(maps, (7, SIZE, SIZE))
  # Both classes at once, all frames in one batch: explain's other code path
  # (K = 2 composes through the materialised matrices).
  e = jax.jit(explain.explain, static_argnums=0)(model, variables, frames, jnp.array([3, 4]))
  want = e.contributions.sum(axis=-1)  # = explain.contribution_maps
  np.testing.assert_allclose(maps, want[:, 0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, e.logits, rtol=1e-5, atol=1e-6)
  # Another class and another clip length: the same compiled function.
  maps5, _, _ = video.explain_frames(model, variables, frames[:5], class_idx=4, batch_size=3)
  np.testing.assert_allclose(maps5, want[:5, 1], rtol=1e-5, atol=1e-6)


def test_class_none_is_the_most_predicted_class(net):
  model, variables = net
  frames = video.prepare_frames(clip(5, seed=1), SIZE)
  maps, logits, c = video.explain_frames(model, variables, frames, batch_size=4)
  # The logits of the explanation pass (checked against explain above), not
  # those of the forward pass that chose the class.
  counts = np.bincount(np.asarray(logits).argmax(-1), minlength=model.num_classes)
  assert counts[c] == counts.max() and c == np.flatnonzero(counts == counts.max())[0]
  chex.assert_shape(maps, (5, SIZE, SIZE))


def test_most_predicted_breaks_ties_to_the_lowest_index():
  logits = np.eye(4)[[2, 1, 2, 1, 3]]
  assert video.most_predicted(logits) == 1


def test_explain_frames_refuses_bad_input(net):
  model, variables = net
  frames = video.prepare_frames(clip(2), SIZE)
  with pytest.raises(ValueError, match="None for the class predicted most often"):
    video.explain_frames(model, variables, frames, class_idx=-1)
  with pytest.raises(ValueError, match="prepare_frames"):
    video.explain_frames(model, variables, clip(2))


# ----------------------------------------------------------------- pictures


def test_map_to_rgb_colours():
  maps = np.array([[[0.0, 1.0, -1.0, 10.0]]], np.float32)
  rgb = video.map_to_rgb(maps, max_value=1.0)
  assert rgb.dtype == np.uint8 and rgb.shape == (1, 1, 4, 3)
  zero, pos, neg, big = rgb[0, 0].astype(int)
  assert zero.min() >= 240                                 # White at 0.
  assert pos[0] >= 200 and pos[1] <= 30 and pos[2] <= 30   # Red for the class.
  assert neg[2] >= 200 and neg[0] <= 30 and neg[1] <= 30   # Blue against it.
  np.testing.assert_array_equal(big, pos)                  # Clipped at max_value.


def test_map_to_rgb_default_limit_is_shared_over_frames():
  rng = np.random.default_rng(0)
  maps = rng.normal(size=(2, 8, 8)).astype(np.float32)
  maps[1] *= 10.0
  maps[0, 0, 0] = maps[1, 0, 0] = 0.5  # The same value in both frames ...
  rgb = video.map_to_rgb(maps)
  np.testing.assert_array_equal(rgb[0, 0, 0], rgb[1, 0, 0])  # ... the same colour.
  limit = np.percentile(np.abs(maps), video.PERCENTILE)
  np.testing.assert_array_equal(rgb, video.map_to_rgb(maps, limit))


def test_side_by_side():
  frames = video.prepare_frames(clip(2), SIZE)
  maps_rgb = video.map_to_rgb(np.ones((2, SIZE, SIZE)), 1.0)
  out = video.side_by_side(frames, maps_rgb)
  chex.assert_shape(out, (2, SIZE, 2 * SIZE, 3))
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out[:, :, :SIZE], np.round(frames * 255))
  np.testing.assert_array_equal(out[:, :, SIZE:], maps_rgb)


# ------------------------------------------------------------------ files


def test_gif_round_trip(tmp_path):
  # GIF has a palette of 256 colours per frame: frames with fewer come back
  # exactly, noisy ones close.
  few = (clip(4, SIZE, 2 * SIZE) // 64 * 64 + 32).astype(np.uint8)
  back = video.read_video(video.write_video(tmp_path / "a.gif", few, fps=10))
  np.testing.assert_array_equal(back, few)
  noisy = clip(4, SIZE, 2 * SIZE)
  back = video.read_video(video.write_video(tmp_path / "a.gif", noisy, fps=10))
  chex.assert_shape(back, noisy.shape)
  assert np.abs(back.astype(int) - noisy).mean() < 8
  assert os.listdir(tmp_path) == ["a.gif"]
  # Renamed from a temporary file, yet with the mode a new file gets.
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(tmp_path / "a.gif").st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("h,w", [(SIZE, 2 * SIZE), (15, 21)])
def test_mp4_round_trip(tmp_path, h, w):
  frames = clip(5, h, w, noise=0.0)  # H.264 and yuv420p blur noise away.
  path = video.write_video(str(tmp_path / "a.mp4"), frames, fps=10)
  back = video.read_video(path)
  # Odd sizes are padded to even ones (H.264 in yuv420p).
  chex.assert_shape(back, (5, h + h % 2, w + w % 2, 3))
  assert np.abs(back[:, :h, :w].astype(int) - frames).mean() < 10  # Lossy (random frames: ~85).
  assert os.listdir(tmp_path) == ["a.mp4"]


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch):
  old = tmp_path / "a.mp4"
  old.write_bytes(b"old")

  def failing_write(unused_module, path, frames, fps):
    with open(path, "wb") as f:
      f.write(b"partial")
    raise RuntimeError("disk full")

  monkeypatch.setattr(video, "_write_mp4", failing_write)
  with pytest.raises(RuntimeError, match="disk full"):
    video.write_video(old, clip(2), fps=10)
  assert os.listdir(tmp_path) == ["a.mp4"] and old.read_bytes() == b"old"


def test_missing_libraries_and_unknown_suffix(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match=r"\.avi"):
    video.write_video(tmp_path / "a.avi", clip(2))
  monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
  with pytest.raises(ImportError, match=r"bash launch/setup.sh video \(or "
                                       r"\.venv/bin/pip install -e '\.\[video\]'\)"):
    video.write_video(tmp_path / "a.mp4", clip(2))
  assert not os.listdir(tmp_path)


def test_explain_video_end_to_end(net, tmp_path):
  model, variables = net
  out = video.explain_video(model, variables, clip(5, 20, 24), tmp_path / "e.gif",
                            image_size=SIZE, batch_size=4)
  frames = video.prepare_frames(clip(5, 20, 24), SIZE)
  maps, _, c = video.explain_frames(model, variables, frames, batch_size=4)
  assert out["class_idx"] == c
  np.testing.assert_allclose(out["maps"], maps, rtol=1e-5, atol=1e-6)
  back = video.read_video(out["path"])
  chex.assert_shape(back, (5, SIZE, 2 * SIZE, 3))
  want = video.side_by_side(frames, video.map_to_rgb(maps))
  assert np.abs(back.astype(int) - want).mean() < 4


@pytest.mark.parametrize("name,content,reason", [
    ("empty.mp4", b"", "ffmpeg: invalid data found when processing input"),
    ("text.mp4", b"hello, not a video\n", "ffmpeg: invalid data found when processing input"),
    ("bad.gif", b"GIF? no.\n", "Pillow can not read it)"),
    ("truncated.gif", None, "Pillow: "),
])
def test_unreadable_video_is_one_error_naming_the_file(net, tmp_path, name, content, reason):
  path = tmp_path / name
  if content is None:  # A real GIF cut in its frame data.
    whole = tmp_path / "whole.gif"
    video.write_video(whole, clip(4), fps=10)
    content = whole.read_bytes()[:whole.stat().st_size // 3]
    whole.unlink()
  path.write_bytes(content)
  expected = "a GIF file" if name.endswith(".gif") else "a video file that ffmpeg decodes"
  with pytest.raises(video.VideoError) as e:
    video.read_video(path)
  msg = str(e.value)
  assert msg.startswith(f"{path} is not a readable video ({reason}") and "\n" not in msg
  assert f"; expected {expected}" in msg and len(msg) < 250 and "ffmpeg version" not in msg
  assert isinstance(e.value, ValueError)
  model, variables = net
  with pytest.raises(video.VideoError, match=f"^{path} is not a readable video"):
    video.explain_video(model, variables, path, tmp_path / "out.mp4", image_size=SIZE)
  assert sorted(os.listdir(tmp_path)) == [name]  # Nothing written.
