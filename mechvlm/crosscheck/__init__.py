"""Cross-check mechvlm against nnsight tracing the untouched Hugging Face model.

``crosscheck(model_or_path, batch=None)`` runs the same experiments twice, on a
`HookedVLM` and on a private eager-attention copy of the HF model traced with nnsight
(``pip install mechvlm[crosscheck]``), and returns a `CrosscheckReport`: max abs and
relative difference per quantity and layer, as a table (``print(report)``) and a dict
(``report.to_dict()``), with dtype-dependent tolerances (`tolerances_for`) and the first
diverging layer when something is out of tolerance.
"""

from mechvlm.crosscheck.report import CrosscheckReport, Row
from mechvlm.crosscheck.run import crosscheck, perturb_layer
from mechvlm.crosscheck.tolerances import TOLERANCES, Tol, tolerances_for

__all__ = ["crosscheck", "perturb_layer", "CrosscheckReport", "Row", "Tol", "TOLERANCES", "tolerances_for"]
