"""The one exception type for data problems a user can cause."""


class DataError(ValueError):
  """Bad input data: the message names the file (or CSV row/column) and what to do.

  The CLI turns it into a one-line message and a non-zero exit.
  """
