"""``mechvlm report``: the seed-000 pipeline (Fig. 1, Fig. 2, Table 1) in one command."""

from .run import ReportConfig, run_report

__all__ = ["ReportConfig", "run_report"]
