"""Deprecated alias of :mod:`stpnet.app.cli`, where this module moved; importing it warns.
``python -m stpnet.cli`` still runs the command line. It goes in the next release."""

import importlib
import sys
import warnings

from ._moved import alias_module

if __name__ == "__main__":  # python -m stpnet.cli; warned from __main__, so shown by default
    warnings.warn("python -m stpnet.cli is deprecated and will be removed in the next release; run "
                  "python -m stpnet.app.cli (or the stpnet command) instead", DeprecationWarning, stacklevel=1)
    sys.exit(importlib.import_module("stpnet.app.cli").main())
alias_module(__name__, "stpnet.app.cli")
