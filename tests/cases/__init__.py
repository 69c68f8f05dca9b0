"""Small models from public bug reports against tools of graphcomp's kind, one module per
case. Each module keeps the report's model code, and tests/test_cases.py asserts what graphcomp
must do with it."""
