"""Data for lrft recipes: GLUE and other classification sets, causal-LM text, and batching.

The recipe's `data` section (a `DataConfig`) flows one way through the package:

    sources         where rows come from: GLUE task, hub id or folder, local files, pkg: paths
      -> splits     which rows: train/eval splits, where, eval_fraction, holdout_fraction, subsets
      -> labels          class ids or regression scores (classification only)
      -> classification  load_classification_data -> tokenize_classification
         causal          load_causal_data (text | prompt_response | messages; -100 = no loss)
      -> batching   make_dataloader: seeded, length-grouped, dynamically padded batches

Every problem a recipe can have with its data (missing file, split or column, empty split, bad
labels, non-text values) is raised as `DataError` before the first training step, naming what was
expected, what was found and the fix. The GLUE task table is `lrft.glue`'s; `GLUE_TASKS` and
`glue_task` are that table under the names callers of this package know.
"""

from lrft.config import resolve_path
from lrft.data.batching import MODEL_INPUTS, LengthGroupedSampler, make_dataloader, padding_fraction
from lrft.data.causal import IGNORE_INDEX, CausalData, load_causal_data
from lrft.data.classification import ClassificationData, load_classification_data, tokenize_classification
from lrft.data.sources import GLUE_TASKS, glue_task
from lrft.data.splits import HOLDOUT_SPLIT
from lrft.errors import DataError

__all__ = [
    "DataError", "LengthGroupedSampler", "load_causal_data", "load_classification_data", "make_dataloader",
    "padding_fraction", "tokenize_classification", "IGNORE_INDEX", "MODEL_INPUTS", "resolve_path",
    "ClassificationData", "CausalData", "GLUE_TASKS", "glue_task", "HOLDOUT_SPLIT",
]
