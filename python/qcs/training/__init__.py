"""Training: :func:`train` and its pieces.

- :mod:`~qcs.training.runstate`: resume point, run-directory lock, stop signals, seeds and
  RNG states, process-wide torch settings;
- :mod:`~qcs.training.data`: datasets and loaders of a run;
- :mod:`~qcs.training.step`: the training forward (network + family loss), optimizer, SAM;
- :mod:`~qcs.training.epoch`: :func:`train_one_epoch`, the :class:`Run` it works on,
  :class:`Callback`;
- :mod:`~qcs.training.evaluation`: :func:`evaluate`;
- :mod:`~qcs.training.saving`: checkpoints, metrics and plots of a run;
- :mod:`~qcs.training.loop`: :func:`train` = setup, then fit.
"""

from .data import Data, prepare_data
from .epoch import Callback, Run, StepInfo, train_one_epoch
from .evaluation import evaluate
from .loop import RunResult, fit, setup, train
from .runstate import TrainingInterrupted, resolve_device, seed_everything

__all__ = ["Callback", "Data", "Run", "RunResult", "StepInfo", "TrainingInterrupted",
           "evaluate", "fit", "prepare_data", "resolve_device", "seed_everything", "setup",
           "train", "train_one_epoch"]
