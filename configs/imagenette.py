r"""The paper's 224-pixel protocol (docs/method.md section 7) on ImageNette: tench (y=0, the target) vs English
springer (y=1), ResNet-18 with one logit, M = 200.

Adam 1e-4, batch 32, 5 epochs; images resized (shorter side 224, bilinear) and center-cropped to 224x224. The
two classes give about 1,918 train / 782 validation images (the validation split is the test split). Get the
data once (fast.ai's imagenette2-320.tgz, checksum verified, extracted to imagenette2-320/{train,val}/<wnid>/
*.JPEG in the default folder `data_dir=""` reads: $CERTSSB_JAX_DATA/imagenette or
~/.cache/certssb_jax/data/imagenette; class ids index the sorted WordNet-id folders: 0 = n01440764 tench,
1 = n02102040 English springer):

  python -m certssb_jax.data fetch imagenette

then:

  python -m certssb_jax.launch --config configs/imagenette.py --workdir runs/imagenette_onepixel_0.25
  python -m certssb_jax.launch --config configs/imagenette.py:sigma_0=0.5 --workdir runs/imagenette_0.5
  python -m certssb_jax.launch --config configs/imagenette.py:defense=cert_ssb --workdir runs/inette_ssb
  python -m certssb_jax.launch --config configs/imagenette.py:data_dir=/data/imagenette2 --workdir runs/inette_own
  python -m certssb_jax.launch --config configs/imagenette.py:source=tfds --workdir runs/inette_tfds   # prepared tfds
  python -m certssb_jax.launch --config configs/imagenette.py:quick --workdir /tmp/imagenette_quick   # smoke test

Variants (comma-separated key=value): trigger (onepixel|fourpixel|blending), sigma_0 (0.25|0.5|1.0 in the
paper), defense (rab|cert_ssb|dpa|...), num_models, epochs, batch_size, learning_rate, bound
(clopper_pearson|hoeffding), alpha, poison_rate, delta, seed, source (image_folder|tfds), data_dir, max_train,
max_test, any dotted field (data.image_size=160); `quick`: 3 models, 1 epoch, 32x32 images, at most 64 / 32
images, same data source (its CI test passes `source=image_folder,data_dir=...` with a tiny local folder). The
paper's code used cats vs dogs: any two-class image folder works with `data_dir=...`. The ResNet-18 trains from
scratch unless `model.pretrained=weights.npz` names saved ImageNet weights (`certssb_jax.models.weights.save_params`).
"""

from __future__ import annotations

from certssb_jax.experiment import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  c.data.source = "image_folder"  # image_folder (the fetched imagenette2-320) | tfds (prepared imagenette)
  c.data.name = "imagenette"  # tfds name, the data set's name in the outputs, and its default folder
  c.data.data_dir = ""  # "": the default folder of `python -m certssb_jax.data fetch imagenette`
  c.data.classes = (0, 1)  # original ids: tench (0) -> y=0 (the target), English springer (1) -> y=1
  c.data.image_size = 224  # shorter side to 224, center crop 224x224
  c.data.max_train = None  # all images of the two classes
  c.data.max_test = None  # all validation images of the two classes
  c.attack.trigger = "onepixel"  # (112, 112) in every channel += delta / sqrt(3)
  c.attack.poison_rate = 0.02  # of the non-target (springer) training images
  c.attack.delta = 1.0  # l2 norm of the trigger
  c.attack.target_class = 0  # tench
  c.model.name = "resnet18"  # ImageNet ResNet-18 (7x7/2 stem, max pool, [2, 2, 2, 2] blocks), one-logit head
  c.train.num_models = 200  # M
  c.train.epochs = 5
  c.train.batch_size = 32
  c.train.learning_rate = 1e-4  # Adam
  # models per vmapped training step: 8 x 32 images of 224x224 (an estimate of ~10 GB of activations; the auto
  # value, all 200 models, would need ~25x that); 0: auto (1 on CPU)
  c.train.models_per_chunk = 8
  c.sigma.sigma_0 = 0.25  # the paper's grid at 224 pixels: 0.25, 0.5, 1.0
  c.certify.batch_size = 128  # test inputs per kernel call (a 224x224x3 input is 192x an MNIST digit)
  c.sigma.batch_size = 64  # samples per search program (each carries S noise draws through ResNet-18)
  variant = config_lib.parse_variant(arg)
  if variant.pop("quick", None):  # CI-sized: a few models, one epoch, tiny images and data (same source)
    c.data.image_size = 32  # ResNet-18 is fully convolutional: 32x32 gives 1x1x512 features
    c.data.max_train = 64
    c.data.max_test = 32
    config_lib.make_quick(c, num_models=3)
    c.train.models_per_chunk = None  # auto: all 3 on an accelerator, 1 on CPU
    c.train.batch_size = 8  # several steps even on tiny data
    c.sigma.batch_size = 32  # the search pads every batch to this size: keep it near the data size
  return config_lib.apply_overrides(c, variant)
