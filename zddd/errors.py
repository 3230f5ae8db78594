"""The conditions a caller of the core can meet, one class each.

Adapters map them to their own vocabulary (D-Bus error names, exit codes); the core knows none.
"""


class ZdddError(Exception):
    """Base of every refusal or failure that the core reports to a caller."""


class InvalidTarget(ZdddError):
    pass


class InvalidArgument(ZdddError):
    pass


class TargetUnhealthy(ZdddError):
    pass


class BackendFailure(ZdddError):
    pass


class InvalidConfig(ZdddError):
    pass
