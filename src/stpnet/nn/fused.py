"""Deprecated alias of :mod:`stpnet.deploy.fused`, where this module moved; importing it warns.
It goes in the next release."""

from .._moved import alias_module

alias_module(__name__, "stpnet.deploy.fused")
