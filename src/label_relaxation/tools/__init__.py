"""Tools apart from the loss: the benchmark CLI and the experiments behind the docs' figures.

* ``cli``: ``label-relaxation bench`` / ``calibrate`` (also ``python -m label_relaxation``).
* ``benchmark``: label relaxation against cross-entropy, eager and compiled, over a sweep of sizes.
* ``training_step``: a whole training step of a small classifier.
* ``linear_benchmark``: the fused output layer + loss (``bench --hidden H``).
* ``calibration``: cross-entropy, label smoothing and label relaxation on real data.
"""
