"""Accuracy: the fraction of predictions equal to their references.

A local copy of the metric `evaluate.load("accuracy")` fetches from the Hub (which the audit cannot
reach offline), without its scikit-learn dependency. Load it with `trap2_hf.audit.load_metric()`.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy = (number of correct predictions) / (number of predictions); in [0, 1]."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    normalize (`bool`, default True): if False, return the number of correct predictions instead.
    sample_weight (`list` of `float`, optional): per-example weights.
Returns:
    accuracy (`float`): in [0, 1] when normalize is True.
Examples:
    >>> metric = trap2_hf.audit.load_metric("accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = (np.asarray(predictions) == np.asarray(references)).astype(np.float64)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        total = float((correct * weights).sum())
        return {"accuracy": total / float(weights.sum()) if normalize else total}
