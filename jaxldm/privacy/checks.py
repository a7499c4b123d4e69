"""One validation rule for the numeric arguments of the privacy modules.

A privacy number outside its range is not a detail: a sampling rate of 0 or a negative noise
multiplier would make the accountant report a guarantee the mechanism does not have. Every module
in `jaxldm.privacy` checks its scalar (or broadcast array) arguments with `check_arg`, so the rule
(NaN is never valid, open and closed ends, integers) and the message ("sampling_rate must be in
(0, 1], got 1.5.") are the same everywhere, and the tests can match the argument's name.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import numpy as np

_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])$")


@functools.cache
def _parse(interval: str) -> tuple[float, float, bool, bool]:
  """'(0, 1]' -> (0.0, 1.0, low closed False, high closed True); 'inf' ends allowed."""
  m = _INTERVAL.match(interval)
  if not m:
    raise ValueError(f"interval {interval!r} must look like '(0, 1]' or '[0, inf)'")
  low, high = float(m.group(2)), float(m.group(3))
  return low, high, m.group(1) == "[", m.group(4) == "]"


def _describe(interval: str, integer: bool) -> str:
  """Readable form of a range: '>= 0', '> 0', 'in (0, 1]', 'a number'; 'an integer ...' if integer."""
  low, high, low_closed, high_closed = _parse(interval)
  if math.isinf(high) and high_closed and math.isinf(low) and low_closed:
    text = ""
  elif math.isinf(high) and not math.isinf(low):
    text = f"{'>=' if low_closed else '>'} {low:g}"
  elif math.isinf(low) and not math.isinf(high):
    text = f"{'<=' if high_closed else '<'} {high:g}"
  else:
    text = f"in {interval}"
  if integer:
    kind = "an integer"
  elif not text or (math.isinf(high) and not high_closed) or (math.isinf(low) and not low_closed):
    kind = "a finite number" if text else "a number"
  else:
    kind = ""
  return " ".join(t for t in (kind, text) if t)


def check_arg(name: str, value: Any, interval: str, *, integer: bool = False) -> np.ndarray:
  """Returns `value` as a float64 array (0-d for a scalar) if every entry lies in `interval`.

  Args:
    name: the argument's name, the first word of the error message.
    value: a number or anything numpy broadcasts (every entry is checked).
    interval: the allowed range in interval notation: "(0, 1]" (a sampling rate), "(0, 1)" (delta),
      "[0, inf)" (finite and non-negative), "[0, inf]" (inf allowed), "[1, inf)" with integer=True
      (a positive count), "[-inf, inf]" (any number but NaN). NaN never lies in an interval.
    integer: also require whole numbers. Bools and strings are refused (True is not a count, and
      numpy would turn "3" into a number).

  Raises:
    ValueError: "{name} must be {range}, got {value}." for a value outside the range, NaN, a
      non-integer where one is required, or something that is not a number.
  """
  low, high, low_closed, high_closed = _parse(interval)

  def fail() -> ValueError:  # Built only when raised: a message costs more than the check.
    shown = repr(value) if isinstance(value, str) else value
    return ValueError(f"{name} must be {_describe(interval, integer)}, got {shown}.")

  if type(value) in (int, float):  # A Python number (e.g. a step, once per training step): no array work.
    v = float(value)
    if not (((v >= low) if low_closed else (v > low)) and ((v <= high) if high_closed else (v < high))):
      raise fail()  # NaN fails both comparisons.
    if integer and not math.isinf(v) and v != math.floor(v):
      raise fail()
    return np.asarray(v)
  if isinstance(value, (bool, np.bool_, str, bytes)) or (isinstance(value, np.ndarray) and value.dtype.kind in "bUS"):
    raise fail()
  try:
    x = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    raise fail() from None
  above = (x >= low) if low_closed else (x > low)
  below = (x <= high) if high_closed else (x < high)
  if not np.all(above & below):  # NaN fails both comparisons.
    raise fail()
  if integer and not np.all(x == np.floor(x)):
    raise fail()
  return x
