"""The package version, in one module that every layer may import (``attnkit/__init__`` re-exports it)."""

__version__ = "0.1.0"
