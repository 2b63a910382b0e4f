"""What happens to each dense layer: layer settings and their checks (:mod:`.settings`), recipes (:mod:`.recipe`),
the budget spec (:mod:`.budget_spec`), one handler per layer kind with its plan (:mod:`.handlers`) and the
knapsack that allocates a budget (:mod:`.allocation`). Imports :mod:`gmcompress.nn`, :mod:`gmcompress.fit` and
:mod:`gmcompress.core`."""
