"""Applications of the estimator: test problems, training loops and their tables and files.

Closed-form test functions (:mod:`.functions`) and gradient descent on them (:mod:`.optimize`); networks
(:mod:`.models`), data sets (:mod:`.data`) and the training loop (:mod:`.train`) with its checkpoints
(:mod:`.checkpoints`); the paper's method names (:mod:`.methods`), step-size strategies
(:mod:`.strategies`) and tables (:mod:`.lrs`, CSV files in ``lrs/``); result files (:mod:`.results`) and
plots (:mod:`.plots`). They use the core (:mod:`frog.estimator` and below), never the experiments or CLI.
"""
