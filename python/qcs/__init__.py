"""The QCS trainer: QCS / DCS / baseline networks for facial expression recognition,
datasets and quadruplet sampling, SAM, checkpoints and the ``qcs`` command.

Importing the package does no work; see :mod:`qcs.cli` for the command line,
:mod:`qcs.train` for the loop and :mod:`qcs.models` for the network.
"""

__version__ = "0.1.0"
