r"""python -m codajax.explore: an explanation explorer in the browser.

  python -m codajax.explore --workdir workdirs/digits      # a trained or imported run
  python -m codajax.explore --pretrained 9L-S-CoDA-SQ-1000  # codajax.pretrained.MODELS

serves a local web page (Gradio, the optional extra `app`: bash launch/setup.sh
app) at http://127.0.0.1:7860. Pick one of the test images (true and
predicted class under each) or upload an image (resized and centre-cropped as
the config's eval pipeline does), then see the top-k classes, and for any
class and any layer the contribution map, the linear map, the sum check and
a post-hoc baseline (GradCAM or IxG) side by side; download the maps as PNG
and .npy. Start-up compiles the model once (`explore_model.Explorer.warm`);
every interaction afterwards reuses the compiled programs.

The page is served to this machine only unless --host names another address
and --allow-remote says so (anyone who reaches the page can run the model).
"""

import argparse
import os
import sys
import tempfile

import numpy as np
from PIL import Image

from codajax import cli

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
PANELS = ("contribution map", "linear map", "baseline")


def _gradio():
  """gradio, or one line saying how to install it."""
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # No calls home.
  try:
    import gradio  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SystemExit(f"codajax.explore needs gradio: {cli.install_hint('app')}.") from None
  return gradio


# -------------------------------------------------------------- callbacks


class Page:
  """What the page's events call: each returns the values of its outputs.

  Errors the user can fix (a bad upload, no image yet) become gr.Error, one
  message in the page; the server keeps serving.
  """

  def __init__(self, explorer, top_k: int = 5):
    self.ex, self.top_k = explorer, top_k
    self.out_dir = tempfile.mkdtemp(prefix="codajax-explore-")

  def gallery(self) -> list:
    """(image, caption) of each test image: "#i: true → predicted" class."""
    from codajax import explore_model as em  # pylint: disable=g-import-not-at-top
    names = self.ex.class_names
    return [(em.upscale(im, 96), f"#{i}: {names[t]} → {names[p]}")
            for i, (im, t, p) in enumerate(zip(self.ex.images, self.ex.labels,
                                               self.ex.predictions))]

  def show_test(self, index, layer, baseline):
    """Test image `index` of the gallery, explained for its predicted class."""
    if not 0 <= int(index) < len(self.ex.images):
      raise self._error(f"there is no test image #{index}; pick one of the "
                        f"{len(self.ex.images)} in the gallery.")
    return self._show(self.ex.images[int(index)], layer, baseline,
                      f"Test image #{int(index)}.")

  def upload(self, path, layer, baseline):
    """An uploaded file, preprocessed as the eval pipeline does, explained."""
    from codajax import explore_model as em  # pylint: disable=g-import-not-at-top
    if not path:
      raise self._error("no file was uploaded; choose an image file.")
    try:
      image = self.ex.decode(path)
    except em.UploadError as e:
      raise self._error(str(e)) from None
    return self._show(image, layer, baseline, f"Uploaded {os.path.basename(path)}.")

  def _show(self, image, layer, baseline, message):
    gr = _gradio()
    from codajax import explore_model as em  # pylint: disable=g-import-not-at-top
    view = self.ex.view(image, None, int(layer), baseline)
    names = self.ex.class_names
    order = np.argsort(-view.logits)[:self.top_k]
    top = {names[i]: float(view.probabilities[i]) for i in order}
    return (image, em.upscale(image), top, gr.update(value=view.cls),
            *self._maps(view), message)

  def explain(self, image, cls, layer, baseline):
    """The maps of the current image for class `cls` at `layer`."""
    if image is None:
      raise self._error("pick a test image in the gallery or upload one first.")
    try:
      view = self.ex.view(np.asarray(image, np.float32), int(cls), int(layer), baseline)
    except ValueError as e:
      raise self._error(str(e)) from None
    return self._maps(view)

  def _maps(self, view):
    """(contribution map, linear map, baseline, sum check, files) of a View."""
    from codajax import explore_model as em  # pylint: disable=g-import-not-at-top
    name = self.ex.class_names[view.cls]
    contrib = em.map_picture(view.contributions, f"contribution to class {name}")
    linear = em.linear_map_picture(view.linear_map, view.encoded)
    base = em.map_picture(view.baseline, f"{view.baseline_name} attribution to {name}")
    return (contrib, linear, base, em.sum_check(view, name),
            self._files(view, (contrib, linear, base)))

  def _files(self, view, pictures) -> list:
    """The current maps as one PNG and three .npy files (overwritten per view)."""
    stem = f"class{view.cls}_layer{view.layer}"
    out = tempfile.mkdtemp(dir=self.out_dir)
    paths = [os.path.join(out, f"maps_{stem}.png")]
    height = max(p.shape[0] for p in pictures)
    row = np.concatenate([np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)),
                                 constant_values=255) for p in pictures], axis=1)
    Image.fromarray(row).save(paths[0])
    for what, arr in ((f"contributions_{stem}", view.contributions),
                      (f"linear_map_class{view.cls}", view.linear_map),
                      (f"{view.baseline_name}_class{view.cls}", view.baseline)):
      paths.append(os.path.join(out, f"{what}.npy"))
      np.save(paths[-1], arr)
    return paths

  @staticmethod
  def _error(message: str):
    return _gradio().Error(message)


# ------------------------------------------------------------------ layout


def build(explorer, top_k: int = 5):
  """The page (gr.Blocks) over a warmed `explore_model.Explorer`."""
  gr = _gradio()
  from codajax import plotting  # pylint: disable=g-import-not-at-top
  page, model = Page(explorer, top_k), explorer.model
  classes = [(f"{i}: {n}", i) for i, n in enumerate(explorer.class_names)]
  layers = [("0: the input [x, 1 − x]", 0)] + [
      (f"{l}: input of layer {l}", l) for l in range(1, model.num_layers)]
  with gr.Blocks(title="codajax explorer", analytics_enabled=False) as demo:
    image = gr.State(None)
    gr.Markdown("## codajax explorer: what the CoDA-Net's own linear map says")
    with gr.Row():
      with gr.Column(scale=2):
        gallery = gr.Gallery(page.gallery(), label="Test images: #, true → predicted class",
                             columns=4,
                             allow_preview=False, format="png", elem_id="gallery")
        index = gr.Number(value=0, precision=0, visible=False)
        upload = gr.File(label="… or upload an image", type="filepath", elem_id="upload")
        message = gr.Markdown(elem_id="message")
      with gr.Column(scale=3):
        with gr.Row():
          picture = gr.Image(label="Image (as the net sees it)", interactive=False, format="png",
                             elem_id="picture")
          top = gr.Label(num_top_classes=top_k, label=f"Top {top_k} (sigmoid probabilities)")
        with gr.Row():
          cls = gr.Dropdown(classes, value=0, label="Class", elem_id="class")
          layer = gr.Dropdown(layers, value=0, label="Layer", elem_id="layer")
          baseline = gr.Radio([("GradCAM", "gradcam"), ("IxG", "ixg")], value="gradcam",
                              label="Post-hoc baseline", elem_id="baseline")
    with gr.Row():
      maps = [gr.Image(label=p, interactive=False, format="png", elem_id=p.replace(" ", "-"))
              for p in PANELS]
    key = plotting.GREY_KEY if explorer.channels == 1 else plotting.RGB_KEY
    gr.Markdown(f"Contribution map: red supports the class, blue opposes it. Linear map: {key}")
    check = gr.Markdown(elem_id="sum-check")
    files = gr.File(label="Download the current maps (PNG, .npy)", file_count="multiple",
                    interactive=False, elem_id="files")
    shown = [image, picture, top, cls, *maps, check, files, message]

    def selected(evt: gr.SelectData):  # The gallery gives the index of the image picked.
      return evt.index
    gallery.select(selected, None, index, api_visibility="private")
    index.change(page.show_test, [index, layer, baseline], shown, api_name="test_image")
    upload.upload(page.upload, [upload, layer, baseline], shown, api_name="upload")
    for i, control in enumerate((cls, layer, baseline)):  # One API name: "explain".
      control.input(page.explain, [image, cls, layer, baseline], [*maps, check, files],
                    api_name=f"explain{'' if i == 0 else i}",
                    api_visibility="public" if i == 0 else "private")
    if len(explorer.images):
      demo.load(page.show_test, [index, layer, baseline], shown, api_visibility="private")
  return demo


# ------------------------------------------------------------ command line


def parse_args(argv) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m codajax.explore", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a trained (or imported) run's workdir")
  source.add_argument("--pretrained", help="a codajax.pretrained.MODELS name")
  p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: "
                 "this machine only)")
  p.add_argument("--port", type=int, default=7860)
  p.add_argument("--allow-remote", action="store_true",
                 help="needed for a --host other than localhost: other machines can reach "
                 "the page and run the model")
  p.add_argument("--num-images", type=int, default=12, help="test images in the gallery")
  p.add_argument("--top-k", type=int, default=5)
  args = p.parse_args(argv)
  if args.host not in LOCAL_HOSTS and not args.allow_remote:
    p.error(f"--host {args.host} would serve the page to other machines; add "
            "--allow-remote to mean it, or leave --host out (127.0.0.1).")
  return args


def load(args):
  """The warmed Explorer of --workdir or --pretrained; SystemExit(1) with one line
  for a workdir without a checkpoint or a pretrained net that cannot be had."""
  cli.quiet_logs()
  from codajax import checkpoint  # pylint: disable=g-import-not-at-top
  from codajax import explore_model as em  # pylint: disable=g-import-not-at-top
  from codajax import pretrained  # pylint: disable=g-import-not-at-top
  try:
    if args.workdir:
      explorer = em.Explorer.from_workdir(args.workdir, args.num_images)
    else:
      explorer = em.Explorer.from_pretrained(args.pretrained, args.num_images)
  except (checkpoint.CheckpointError, pretrained.PretrainedError) as e:
    fix = (" Train it first (python -m codajax.main --config ... --workdir W) or give "
           "--pretrained NAME." if isinstance(e, checkpoint.CheckpointError) else "")
    print(f"codajax.explore: {' '.join(str(e).split())}{fix}", file=sys.stderr)
    raise SystemExit(1) from None
  print(f"codajax.explore: compiling ({explorer.model.num_layers} layers, "
        f"{len(explorer.images)} test images) ...", flush=True)
  explorer.warm()
  return explorer


def main(argv=None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  gr = _gradio()
  explorer = load(args)
  if args.host not in LOCAL_HOSTS:
    print(f"codajax.explore: WARNING: serving on {args.host}:{args.port}: other machines "
          "can open the page and run the model; there is no login.", file=sys.stderr)
  demo = build(explorer, args.top_k)
  demo.queue(default_concurrency_limit=1)
  demo.launch(server_name=args.host, server_port=args.port, ssr_mode=False,
              max_file_size=gr.FileSize.MB * 50, footer_links=["api"])


if __name__ == "__main__":
  main()
