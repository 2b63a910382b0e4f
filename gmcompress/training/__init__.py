"""Distillation fine-tuning of a compressed model against its original (the teacher): :func:`finetune`.

One loop for one process or many: under ``torchrun`` (``WORLD_SIZE > 1``) the student is wrapped in
``DistributedDataParallel``. Data given as a Dataset (or tensors) is sharded with ``DistributedSampler``; a
single process uses the same sampler with one replica, so a run with the same *global* batch sees the same
batches (the DDP ranks split each global batch) and reaches the same weights up to float summation order.
Data given as batches (a DataLoader, a list of batches) is used as it comes: see :func:`finetune`.

Checkpoints (``checkpoint_dir``): ``last.pt`` (the model, :func:`gmcompress.save` format) plus
``trainer.pt`` (optimizer, schedule, step, RNG states, history and the run's *fingerprint*), written by
rank 0 every ``checkpoint_every`` steps, at each epoch end and when Ctrl-C interrupts; a new call with the
same directory and the same run (same fingerprint) resumes exactly where it stopped, a different run fails
(see ``resume``). ``best.pt`` holds the best model by ``eval_fn``. Weights that are not finite are never saved.

A NaN/inf loss or gradient never reaches the weights: :class:`NonFiniteError` (``nonfinite="raise"``), or the
batch is skipped and recorded in :class:`FinetuneResult` (``nonfinite="skip"``).

The modules, each depending only on those before it: :mod:`.result` (what a run returns, the non-finite
error), :mod:`.settings` (hyper-parameters and their validation), :mod:`.losses`, :mod:`.fingerprint`,
:mod:`.data` (the data forms), :mod:`.state` (the trainer state), :mod:`.epochs` (an epoch's batches),
:mod:`.checkpoint`, :mod:`.taps` (inner outputs as targets: ``finetune(features=...)`` and
:class:`FeatureTaps`), :mod:`.mixing` (blended inputs for distillation from few examples:
:class:`MixedInputs`), :mod:`.step` (one optimizer step), :mod:`.prepare` (everything before the first step)
and :mod:`.loop` (:func:`finetune` itself).
"""

from .loop import finetune
from .mixing import MixedInputs
from .result import FinetuneResult, NonFiniteError
from .settings import LOSSES
from .taps import FeatureTaps

__all__ = ["finetune", "FinetuneResult", "NonFiniteError", "LOSSES", "FeatureTaps", "MixedInputs"]
