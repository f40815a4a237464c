"""smolcluster: a synchronous gradient-averaging parameter server for a few machines."""

__version__ = "0.1.0"
