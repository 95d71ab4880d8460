"""What --mode evaluate can be asked for, declared once and without jax.

The attribution methods of `codajax.attribution`, each with its options and
their defaults (the authors' settings; that module's docstring says what each
one means), and the metrics of `codajax.metrics` with their choices. The
config schema (`codajax.config_lib`, which imports no jax) reads them from
here, and the modules that compute them build on them.
"""

# Each method's options with their defaults (--config.evaluation.options.<method>).
OPTIONS = {
    "ours": {}, "grad": {}, "ixg": {},
    "intgrad": dict(steps=20, quadrature="gausslegendre", chunk=4),
    "deeplift": {},
    "gradcam": dict(layer=-1),
    "occ5": dict(stride=2, exact_patch=False, chunk=32),
    "occ9": dict(stride=2, exact_patch=False, chunk=32),
    "rise": dict(num_masks=6000, s=6, p=0.1, seed=42, chunk=32),
    "lime": dict(num_samples=256, num_features=3, kernel_size=1, max_dist=200, ratio=0.2,
                 seed=42, batch_size=32),
}
METHODS = tuple(OPTIONS)
# intgrad's `quadrature`: captum's Gauss-Legendre default or its "riemann_right".
QUADRATURES = ("gausslegendre", "riemann")
# The methods with stored results in the authors' repository (the paper's figures).
PAPER_METHODS = ("ours", "grad", "ixg", "intgrad", "deeplift", "gradcam", "occ5", "occ9")

# The metrics (codajax.metrics) and pixel removal's choices: the order in
# which pixels go (least important first, as the paper, or most) and what a
# removed pixel becomes (all 2C channels of [x, 1 - x] zeroed, the original,
# or black).
METRICS = ("localisation", "pixel_removal")
ORDERS = ("least", "most")
FILLS = ("encoded_zero", "black")
