"""The QCS trainer: QCS / DCS / baseline networks for facial expression recognition,
datasets and quadruplet sampling, SAM, checkpoints and the ``qcs`` command.

Importing the package does no work; see :mod:`qcs.cli` for the command line,
:mod:`qcs.training` for the loop, :mod:`qcs.families` for the model families and
:mod:`qcs.models` for the networks.
"""

__version__ = "0.1.0"
