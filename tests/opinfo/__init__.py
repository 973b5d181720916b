"""OpInfo conformance suite: every op of PyTorch's op_db through every
transform, against stock PyTorch (see test_opinfo.py and report.py)."""
