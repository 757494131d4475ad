"""The statistics workbook (`dump_stats_xlsx_path`): moved to tables.py; these names stay for callers."""

from .tables import OUTLIER_FACTOR, channel_outlier_ratio, outlier_cells  # noqa: F401
from .tables import workbook_rows as rows  # noqa: F401
from .tables import write_workbook as write  # noqa: F401
from .tables import write_workbook_from_files as write_from_files  # noqa: F401
