"""Ray entry points (thin shells over ``odin_engine``). Each is ``python -m jobs.<name>``."""
