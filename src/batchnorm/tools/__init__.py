"""Model tools: fold batch norm for inference, precise statistics, the BN doctor, converters.

- :func:`fold_batchnorm` - fold each BN into the Conv/Linear next to it (returns ``(model, report)``);
- :func:`recalibrate` - set running statistics to the exact pooled statistics over batches;
- :func:`diagnose` - find BN pitfalls, returns a printable/JSON :class:`Report`;
- :func:`convert` - swap BN flavours (torch.nn, this library's, renorm, ghost, frozen, sync, group norm).

Each has a tensor-level core (e.g. :func:`fold_bn_into_previous`) and a command
(``batchnorm fold | recalibrate | doctor``, see :mod:`batchnorm.tools.cli`). Which modules are batch
norms, and what they apply after normalizing (e.g. timm's ``BatchNormAct2d`` activation), comes from one
registry: :mod:`batchnorm.nn.kinds`.
"""

from .convert import convert
from .doctor import Finding, Report, diagnose
from .fold import FoldReport, bn_scale_shift, fold_batchnorm, fold_bn_into_next, fold_bn_into_previous, stats_problem
from .recalibrate import recalibrate

__all__ = [
    "fold_batchnorm",
    "FoldReport",
    "bn_scale_shift",
    "fold_bn_into_previous",
    "fold_bn_into_next",
    "stats_problem",
    "recalibrate",
    "diagnose",
    "Report",
    "Finding",
    "convert",
]
