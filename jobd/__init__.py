"""jobd: a Linux-native job daemon."""

__version__ = "0.1.0"
