"""Detection of client impersonation (OWASP T40): signals, actions, events."""

from tokenbroker.detection.observe import Observe, networks_of, resource_digest
from tokenbroker.detection.signals import SEVERITY, SIGNAL_BITS, Action, Signal, Thresholds

__all__ = ["SEVERITY", "SIGNAL_BITS", "Action", "Observe", "Signal", "Thresholds", "networks_of", "resource_digest"]
