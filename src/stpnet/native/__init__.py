"""Deprecated alias of :mod:`stpnet.deploy.native`, where this package moved; importing it warns.
Its submodules ``build`` and ``onepass`` are aliased too. It goes in the next release."""

from .._moved import alias_module

alias_module(__name__, "stpnet.deploy.native", submodules=("build", "onepass"))
