import os
import sys

# Tests import their helpers (multiproc.py) as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
