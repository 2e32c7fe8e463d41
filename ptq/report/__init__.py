"""Tables and plots from run records.

records.py holds what every view needs (reading, labels, order, bits per weight, full precision, published
numbers); table.py, plots.py and console.py each build one view from it and do not import one another.
"""

from ptq.report.cli import main
from ptq.report.console import console_table
from ptq.report.plots import write_plots
from ptq.report.records import find_records, metric_columns, metric_value
from ptq.report.table import markdown_table, write_csv

__all__ = [
    "console_table",
    "find_records",
    "main",
    "markdown_table",
    "metric_columns",
    "metric_value",
    "write_csv",
    "write_plots",
]
