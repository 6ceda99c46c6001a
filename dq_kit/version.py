"""The dq_kit version, recorded in every report and checkpoint dq_kit writes."""

__version__ = "0.1.0"
