"""Test-only hooks (fault injection) that product code calls at named points."""
