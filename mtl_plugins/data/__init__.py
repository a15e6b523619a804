"""Framework-independent data utilities (synthetic datasets, multi-dataset sampling)."""
