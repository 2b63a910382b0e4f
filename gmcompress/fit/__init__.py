"""Fitting a dense weight by a (relaxed) group matrix: the plain fit (:mod:`.plain`), the fast activation-aware
fits from streamed input statistics (:mod:`.aware`) and the scipy reference they are tested against
(:mod:`.reference`). Imports only :mod:`gmcompress.core`."""
