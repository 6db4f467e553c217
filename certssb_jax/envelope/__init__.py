r"""RAB's envelope over sigma, and the sample-specific designs judged against it (docs/results.md).

RAB certifies at one noise level; which level is best depends on the radius asked for. The field's comparison
(Cohen et al.'s "vary noise" analysis) trains RAB at a grid of sigma and takes, at every radius, the best
certified accuracy over the grid: the envelope. A sample-specific design helps only where its curve rises above
the envelope. This program trains (or reuses) RAB at every sigma of the grid and the Cert-SSB runs asked for, on
the same data and seed, evaluates the grid selector (``answers``) on RAB's trained models, and writes per class
pair, seed and M (``<key>``: ``fashion_mnist_0-1_onepixel_seed0_M64``, say):

* ``envelope_<key>.png``: certified accuracy against the joint radius and against the test-input radius; RAB's
  curves thin over their envelope (a pale band), the designs on top;
* ``attack_<key>.png``: clean accuracy, ERA and ASR against sigma, certified and by majority vote;
* ``envelope_<key>.md`` / ``.json``: every row's numbers, the radii where each design rises above or falls below
  the envelope (and by how much), and the spread of the designs' sigma_x.

The modules, in the order the program uses them: ``answers`` (the rows' certified answers, read from finished
runs, and the grid selector's), ``comparison`` (every row against the envelope), ``figures`` (the plots),
``pages`` (the markdown: the section and docs/results.md), ``program`` (``run_envelope`` and the study's
flags):

  python -m certssb_jax.studies envelope --config configs/fashion_mnist.py:num_models=32 \
      --sigmas 0.12,0.25,0.375,0.5,1.0 --workdir runs/envelope --results_md docs/results.md
"""
