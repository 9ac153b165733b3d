"""Engine-specific pieces of the transfer (one module per engine).

Callers pick the module with `connections[alias].vendor`; everything here
takes aliases and plain values, never prints, and raises Django's
database errors for the caller to turn into RollbackErrors.
"""
