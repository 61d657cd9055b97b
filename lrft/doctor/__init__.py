"""The LR doctor: read a finished (or running) run and say what its learning rate did.

:func:`diagnose` classifies a run as ``diverged``, ``exploding``, ``oscillating``, ``stalled``,
``overfitting``, ``healthy`` or ``insufficient_data`` from robust statistics of its logged
curves, with the evidence (steps and numbers), advice, and the settings to change, computed from
the run's own LR. It reads lrft's ``metrics.jsonl`` and a HF Trainer's ``trainer_state.json``
alike: the same curve gets the same verdict, with advice as recipe overrides or TrainingArguments.

The package, one concern per module; each imports only modules above it in this list:

- ``thresholds``: every threshold and LR factor, with its source;
- ``stats``: smoothing and robust statistics of a curve (numpy, vectorised);
- ``dialect``: how advice spells settings (recipe overrides, TrainingArguments);
- ``trainer``: a Trainer output folder read as a ``lrft.runlog.RunLog`` (it writes nothing);
- ``curves``: :class:`Curves`, the doctor's view of one run, built from a ``RunLog``;
- ``advice``: :class:`Diagnosis` and the wording of LR changes;
- ``rules``: one check per verdict, most severe first;
- ``sources``: which reader a path needs, and the errors for paths that hold no run;
- the figure is `lrft.plots.plot_diagnosis` (every figure lives in lrft/plots.py);
- ``command``: :func:`diagnose`, :func:`format_diagnosis`, and ``lrft diagnose``'s body.

Neither torch nor transformers is imported.
"""

from lrft.doctor.advice import Diagnosis
from lrft.doctor.command import diagnose, diagnose_run, format_diagnosis, read_curves
from lrft.doctor.curves import Curves
from lrft.plots import plot_diagnosis
from lrft.doctor.stats import smooth_loss
from lrft.doctor.thresholds import DIVERGED_LOSS_FACTOR, VERDICTS

__all__ = ["DIVERGED_LOSS_FACTOR", "VERDICTS", "Curves", "Diagnosis", "diagnose", "diagnose_run",
           "format_diagnosis", "plot_diagnosis", "read_curves", "smooth_loss"]
