"""Post-hoc OOD detectors beyond ODIN, by kind (the registry is :mod:`odin_engine.methods`).

* :mod:`.features` — the penultimate features ``h``: a forward pre-hook on the classifier head;
* :mod:`.logit` — from the logits alone (GEN, energy);
* :mod:`.shaping` — activation shaping (SCALE, ASH-S, ReAct, AdaSCALE);
* :mod:`.distance` — feature distance to reference statistics (KNN, ViM, NCI, fDBD);
* :mod:`.fit` — the fitted reference statistics (:class:`~.fit.FitStats`) and their streaming
  accumulator; :mod:`.reference` runs it over reference images;
* :mod:`.passes` — the one scoring pass all methods read.
"""
