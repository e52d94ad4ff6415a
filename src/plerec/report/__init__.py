"""Out: tables of metrics and MTL gains, comparison summaries, plots and the HTML report."""

from plerec.report.tables import PRIMARY, gains_against_single, metrics_table

__all__ = ["PRIMARY", "gains_against_single", "metrics_table"]
