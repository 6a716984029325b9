"""The papers' experiments, one module each, run as ``python -m metatele.experiments.NAME``:

``optimizers`` (P2 Fig. 5), ``sharpness_curvature`` (P2 Fig. 4), ``correlation`` (P2 Table 1),
``displacement`` (P2 Fig. 7), ``benchmark_functions`` (P1 section 5: Rosenbrock and Booth), ``regression``
(P1 3-layer regression). Each writes ``results.json`` and PNG/PDF figures to ``--out``; ``--quick`` runs in
seconds. P1 and P2 are the two papers listed in ``docs/references.md``.
"""
