"""One exception hierarchy for dpsynth. Every error names the file, column or value it is about."""


class DpsynthError(Exception):
    """Base class: the CLI turns these into a one-line message and a non-zero exit."""

    exit_code = 2


class SchemaError(DpsynthError):
    """The schema file is malformed, still a draft, or does not match the data."""


class DataError(DpsynthError):
    """A data file cannot be used: empty, duplicate columns, wrong dtypes, values outside the schema."""


class PrivacyParameterError(DpsynthError):
    """epsilon / delta / sampling parameters are invalid for this data set."""


class BudgetExceededError(DpsynthError):
    """A mechanism would push the privacy spend past the budget."""

    exit_code = 3


class ModelError(DpsynthError):
    """A model directory is missing files, has a bad checkpoint, or does not match its manifest."""


class AuditFailedError(DpsynthError):
    """The privacy audit refused a release."""

    exit_code = 4
