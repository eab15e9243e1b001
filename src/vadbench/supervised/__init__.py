"""The supervised track: methods trained with labelled anomalies, evaluated k-fold (`protocol`), reported
in their own leaderboard section, never mixed with the one-class results."""

from vadbench.supervised.params import SUPERVISED_METHODS, ClassifierParams, SupervisedParams
from vadbench.supervised.protocol import FoldData, LabelledSource, TooFewAnomaliesError, assign_folds, make_folds

__all__ = [
    "SUPERVISED_METHODS",
    "ClassifierParams",
    "FoldData",
    "LabelledSource",
    "SupervisedParams",
    "TooFewAnomaliesError",
    "assign_folds",
    "make_folds",
]
