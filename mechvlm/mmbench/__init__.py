"""MMBench evaluation (METHODS §5; seed 000 App. A.1 and Table 1).

* `load_mmbench` / `write_mmbench`: the TSV format and its quirks (`tsv`).
* `mmbench_prompt`: the seed-000 prompt (`prompt`).
* `can_infer`: VLMEvalKit's letter extraction; `classify_output` (`extract`).
* `score_records`: accuracy ± std, per category, circular groups, output kinds (`scoring`).
* `CONDITIONS`: none / text→image / text→EOI knockouts in both modes (`conditions`);
  parametrised ``prune:...``, ``skip:...``, ``inject:...`` (`visual_conditions`).
* `evaluate`: generate, extract and score under each condition (`evaluate`).
* `table1`, `outputs_table`, `print_report`, `save_results` (`report_tables`).

Greedy generation itself lives in `mechvlm.generation`.
"""

from mechvlm.mmbench.conditions import CONDITIONS, DIRECTIONS, Condition, resolve_conditions
from mechvlm.mmbench.evaluate import InputBuilder, evaluate, evaluate_condition
from mechvlm.mmbench.extract import OUTPUT_KINDS, RULES, can_infer, classify_output
from mechvlm.mmbench.prompt import mmbench_prompt
from mechvlm.mmbench.report_tables import load_results, outputs_table, print_report, save_results, table1
from mechvlm.mmbench.scoring import accuracy_std, score_records
from mechvlm.mmbench.tsv import MMBenchFormatError, MMBenchItem, check_item_images, load_mmbench, write_mmbench
from mechvlm.mmbench import visual_conditions as _visual_conditions  # noqa: E402,F401  registers prune/skip/inject

__all__ = [
    "CONDITIONS", "DIRECTIONS", "OUTPUT_KINDS", "RULES", "Condition", "InputBuilder", "MMBenchFormatError",
    "MMBenchItem", "accuracy_std", "can_infer", "check_item_images", "classify_output", "evaluate", "evaluate_condition",
    "load_mmbench", "load_results", "mmbench_prompt", "outputs_table", "print_report", "resolve_conditions",
    "save_results", "score_records", "table1", "write_mmbench",
]
