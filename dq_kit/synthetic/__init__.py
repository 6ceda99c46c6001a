"""Synthetic inputs for tests, the demo and calibration: drawn shapes (``drawing``) and tiny models of the
real architectures with offline processors (``tiny``).

Example:
    >>> from dq_kit.synthetic import tiny
    >>> tiny.FAMILIES[0]
    'qwen2_vl'
"""

