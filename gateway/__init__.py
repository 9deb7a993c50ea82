"""Market-data WebSocket gateway: Redis pub/sub trades to WebSocket clients."""
from .config import Config, ConfigError

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "__version__"]
