"""``mechvlm report``: the seed-000 pipeline (Fig. 1, Fig. 2, Table 1) on one or several
models in one command."""

from .run import ModelRun, ReportConfig, compute_runs, run_report

__all__ = ["ModelRun", "ReportConfig", "compute_runs", "run_report"]
