"""The engine: the only code that changes job state; pure decisions live beside it."""
