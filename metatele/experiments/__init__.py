"""The papers' experiments, one module each, run as ``python -m metatele.experiments.NAME``:

``optimizers`` (P2 Fig. 5), ``sharpness_curvature`` (P2 Fig. 4), ``correlation`` (P2 Table 1),
``displacement`` (P2 Fig. 7), ``test_functions`` (P1 Rosenbrock and Booth), ``regression`` (P1 3-layer
regression). Each writes ``results.json`` and PNG/PDF figures to ``--out``; ``--quick`` runs in seconds.
"""
EXPERIMENTS = ("optimizers", "sharpness_curvature", "correlation", "displacement", "test_functions", "regression")
