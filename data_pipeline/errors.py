"""The one exception type the data pipeline raises for bad input."""


class DataError(Exception):
    """Bad or missing data: the message is one line naming the offending file, shard or dir."""
