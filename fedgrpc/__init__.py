"""fedgrpc: federated learning over gRPC with DIG-FL contribution scoring."""

__version__ = "0.1.0"

__all__ = ["__version__"]
