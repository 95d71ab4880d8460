"""python -m codajax.explore: the explorer's functions, its HTTP API (gradio_client)
and its page in a real headless browser (Debian's chromium + chromium-driver).

One tiny workdir (configs/digits.py:tiny with architectures.tiny, random
parameters saved as a checkpoint) and one warmed Explorer serve every test.
The browser test skips without chromium, except where
$CODAJAX_REQUIRE_BROWSER=1 (.ci/run), where it fails instead.
"""

import logging
import os
import shutil
import socket

import jax
import numpy as np
from PIL import Image
import pytest

from codajax import architectures
from codajax import checkpoint
from codajax import config_lib
from codajax import explore
from codajax import explore_model
from codajax import input_pipeline
from codajax import models
from configs import digits as digits_config

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Gradio's own use of pandas 3 warns; nothing of codajax's.
pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A digits workdir with one checkpoint of a 3-layer net (random weights)."""
  c = digits_config.get_config("tiny")
  c.model.update(architectures.tiny(10))
  config = config_lib.resolve(c, 10, 1)
  model = models.from_config(config.model)
  params = model.init(jax.random.key(0), np.zeros((1, 16, 16, 1), np.float32))["params"]
  path = str(tmp_path_factory.mktemp("explore") / "digits")
  mngr = checkpoint.manager(path, asynchronous=False)
  checkpoint.save(mngr, 1, params, None, {"model": config.model.to_dict(),
                                          "config": config.to_dict()})
  mngr.wait_until_finished()
  mngr.close()
  return path


@pytest.fixture(scope="module")
def explorer(workdir):
  ex = explore_model.Explorer.from_workdir(workdir, num_images=6)
  ex.warm()
  return ex


@pytest.fixture(scope="module")
def server(explorer):
  """The page, served on a free local port: (url, demo)."""
  demo = explore.build(explorer)
  demo.queue()
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                          ssr_mode=False, quiet=True)
  yield url, demo
  demo.close()


class CompileCounter(logging.Handler):
  """Counts jax's "Compiling ..." log lines (jax.log_compiles)."""

  def __init__(self):
    super().__init__()
    self.names = []

  def emit(self, record):
    if record.getMessage().startswith("Compiling"):
      self.names.append(record.getMessage()[:80])


@pytest.fixture
def no_compiles(explorer):
  """Fails the test if anything compiles while it runs (after the warm-up)."""
  counter, logger = CompileCounter(), logging.getLogger("jax")
  logger.addHandler(counter)
  before = explorer.compiled_programs()
  with jax.log_compiles():
    yield
  logger.removeHandler(counter)
  assert counter.names == [] and explorer.compiled_programs() == before, counter.names


def png(path, array):
  Image.fromarray(np.asarray(array, np.uint8)).save(path)
  return str(path)


# ------------------------------------------------------------- functions


def test_views_sum_to_logit_minus_bias_at_every_layer_without_recompiling(
    explorer, no_compiles):
  image = explorer.images[1]
  seen = set()
  for layer in range(explorer.model.num_layers):
    for cls in (0, 7):
      view = explorer.view(image, cls, layer, "ixg" if cls else "gradcam")
      assert abs(view.total - view.target) <= 1e-5 * max(1.0, abs(view.target))
      assert view.baseline.shape == image.shape[:2]
      assert view.linear_map.shape == image.shape[:2] + (2,)  # [x, 1 - x] of 1 channel.
      seen.add(view.contributions.tobytes())
      assert "Σ contributions" in explore_model.sum_check(view, "7")
  assert len(seen) == 2 * explorer.model.num_layers  # Every class and layer differs.
  assert explorer.view(image).cls == int(np.argmax(explorer.view(image).logits))


def test_gallery_is_the_eval_pipelines_test_images_with_the_models_predictions(explorer):
  images, labels = input_pipeline.first_test_examples(explorer.config, 6)
  np.testing.assert_array_equal(explorer.images, images)
  np.testing.assert_array_equal(explorer.labels, labels)
  logits = explorer.model.apply(explorer.variables, images)
  np.testing.assert_array_equal(explorer.predictions, np.argmax(logits, -1))


def test_uploads_are_preprocessed_or_refused_with_one_clear_message(explorer, tmp_path):
  white = explorer.decode(png(tmp_path / "white.png", np.full((40, 30), 255)))
  assert white.shape == (16, 16, 1) and np.allclose(white, 1.0)
  (tmp_path / "notes.txt").write_text("not an image")
  rgb = png(tmp_path / "rgb.png", np.zeros((20, 20, 3)))
  huge = tmp_path / "huge.png"
  Image.new("1", (8000, 6000)).save(huge)  # 48 Mpixel, a small file.
  for path, says in ((tmp_path / "notes.txt", "not an image"), (rgb, "3 channel(s)"),
                     (huge, "8000 x 6000 pixels")):
    with pytest.raises(explore_model.UploadError, match="upload|convert|scale") as e:
      explorer.decode(str(path))
    assert says in str(e.value) and "\n" not in str(e.value)


def test_command_line_refuses_remote_hosts_and_workdirs_without_checkpoints(
    tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    explore.parse_args(["--workdir", "w", "--host", "0.0.0.0"])
  assert e.value.code == 2 and "--allow-remote" in capsys.readouterr().err
  args = explore.parse_args(["--workdir", "w", "--host", "0.0.0.0", "--allow-remote"])
  assert args.host == "0.0.0.0" and explore.parse_args(["--workdir", "w"]).host == "127.0.0.1"
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(SystemExit) as e:
    explore.load(explore.parse_args(["--workdir", str(empty)]))
  err = capsys.readouterr().err.strip()
  assert e.value.code == 1 and len(err.splitlines()) == 1 and "no trained run" in err


# --------------------------------------------------------------- HTTP API


def test_http_api_explains_refuses_bad_uploads_and_keeps_serving(explorer, server, tmp_path,
                                                                 no_compiles):
  from gradio_client import Client, handle_file  # pylint: disable=g-import-not-at-top
  from gradio_client import exceptions  # pylint: disable=g-import-not-at-top
  client = Client(server[0], verbose=False)
  shown = client.predict(2, 0, "gradcam", api_name="/test_image")
  _, top, cls, contrib, _, _, check, files, _ = shown  # (gr.State is not in the API.)
  assert explorer.class_names[cls["value"]] == top["label"]  # The class picked: the top one.
  assert "Σ contributions" in check and len(files) == 4
  maps = client.predict(5, 1, "ixg", api_name="/explain")
  assert "layer 1" in maps[3] and open(maps[0], "rb").read() != open(contrib, "rb").read()
  saved = np.load([f for f in maps[4] if f.endswith(".npy") and "contributions" in f][0])
  assert saved.shape == (16, 16)  # Layer 1's input: the first layer keeps the size.
  (tmp_path / "notes.txt").write_text("not an image")
  with pytest.raises(exceptions.AppError, match="not an image"):
    client.predict(handle_file(str(tmp_path / "notes.txt")), 0, "gradcam", api_name="/upload")
  grey = png(tmp_path / "grey.png", np.arange(64 * 48).reshape(64, 48) % 256)
  uploaded = client.predict(handle_file(grey), 0, "gradcam", api_name="/upload")
  assert "Uploaded grey.png" in uploaded[-1] and "Σ contributions" in uploaded[6]


# ----------------------------------------------------------------- browser


def _chrome():
  if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
    if os.environ.get("CODAJAX_REQUIRE_BROWSER") == "1":
      pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} is missing: apt-get install chromium "
                  "chromium-driver (CODAJAX_REQUIRE_BROWSER=1 forbids skipping).")
    pytest.skip("no chromium/chromium-driver (apt-get install chromium chromium-driver)")
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
              "--window-size=1400,1300"):
    options.add_argument(arg)
  return webdriver.Chrome(options=options,
                          service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


def test_page_in_headless_chromium_follows_image_class_layer_and_upload(server, tmp_path):
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  driver = _chrome()
  css = lambda sel: driver.find_elements(By.CSS_SELECTOR, sel)
  panels = ("#picture", "#contribution-map", "#linear-map", "#baseline")
  srcs = lambda: [(css(f"{p} img") or [None])[0] and css(f"{p} img")[0].get_attribute("src")
                  for p in panels]
  check = lambda: " ".join(e.text for e in css("#sum-check"))
  until = lambda ok: WebDriverWait(driver, 60, 0.2).until(lambda _: ok())

  def pick(dropdown, option):
    css(f"{dropdown} input")[0].click()
    until(lambda: any(o.text.endswith(option) for o in css("li.item")))
    next(o for o in css("li.item") if o.text.endswith(option)).click()

  try:
    driver.get(server[0])
    until(lambda: "Σ contributions" in check() and all(srcs()))  # Test image #0 on load.
    first = srcs()
    css("#gallery button.thumbnail-item")[3].click()
    until(lambda: all(a != b for a, b in zip(srcs(), first)))
    assert "Test image #3." in css("#message")[0].text
    before, text = srcs(), check()
    pick("#class", "7: 7")
    until(lambda: srcs()[1] != before[1] and check() != text)
    assert srcs()[0] == before[0]  # The same image, another class.
    assert _bytes(srcs()[1]) != _bytes(before[1])
    before = srcs()
    pick("#layer", "1: input of layer 1")
    until(lambda: "layer 1" in check() and srcs()[1] != before[1])
    before = srcs()
    grey = png(tmp_path / "upload.png", np.tri(40, 40) * 255)
    css("#upload input[type=file]")[0].send_keys(grey)
    until(lambda: all(a != b for a, b in zip(srcs(), before)) and "Uploaded" in
          css("#message")[0].text)
    assert "Σ contributions" in check() and "layer 1" in check()
  finally:
    driver.quit()


def _bytes(url):
  import urllib.request  # pylint: disable=g-import-not-at-top
  with urllib.request.urlopen(url) as r:
    return r.read()
