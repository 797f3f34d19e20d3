"""Package data: the trained reference networks (``<name>.pt`` weights and ``<name>.json`` cards)."""
