"""Deployment library for Fed-BioMed over a WireGuard VPN.

Knows nothing of Invoke: the tasks, the Fabric entry points, the tests and the
in-container peer tool all call into it.
"""
