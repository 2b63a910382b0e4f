"""Measuring a model or a layer: latency (:mod:`.timing`), MACs, bytes and equivariance (:mod:`.counts`), a GM
layer's forms timed on its real input (:mod:`.paths`) and the whole model against the original (:mod:`.fidelity`)."""
